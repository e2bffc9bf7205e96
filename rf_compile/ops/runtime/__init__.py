"""Run-time state of the op: the step clock, dense warm-up, ARM reuse and statistics, per model.

Everything that changes from call to call is a device tensor updated by device operations, so a
call never makes the host wait and a CUDA graph (``mode="reduce-overhead"`` / ``"max-autotune"``)
replays exactly the decisions eager execution makes:

- the *step clock* (one per device) turns the model's ``timestep`` input into a step index: a new
  value is a new step, a value above the last starts a new video;
- a call is dense while that step is below ``ceil(dense_warmup * num_steps)``; "dense" is one more
  plan variant, selected on the device;
- the ARM re-runs every ``arm_every``-th sparse call; in between its last decision is reused;
- statistics accumulate in device counters; only ``stats()`` reads them (a host sync, off the hot path).

State belongs to a compiled model *instance*: the rewrite pass gives the op one of the model's
parameters (``owner``), and sites are kept per owner, so two models of one class (Wan 2.2's two
experts) never share counters or decisions. Tensors that outlive a call are allocated outside any
CUDA-graph memory pool (``rf_compile.persistent``), and reset in place (captured graphs keep
pointing at them).

Modules, one job each (each imports only those above it):

- ``clock``: the step clock of each device;
- ``sites``: compile-time site specs and their registry (what the rewrite pass registers);
- ``shapes``: device state of one site for one (layout, batch size), and one call's decisions;
- ``summaries``: device counters -> the host-side statistics of a site;
- ``call_stack``: the modules and arguments on the Python call stack (the calling model);
- ``models``: per model instance: its sites, their warm-up and the clock hook;
- ``stats``: the public ``stats()`` and ``reset()``.
"""
