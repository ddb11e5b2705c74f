"""What the site agent and a task process say to each other, besides the steps: a module with no
imports, so that the task process can read it before its sandbox, while it is still one thread."""

READY = b"ready"  # the task process has loaded torch (and, after ADOPT, taken its run)
ADOPT = b"adopt:"  # + JSON {"run_id", "scratch", "memory_mb"}: sent once when a run adopts a task process
ISOLATION_REFUSED = 3  # the task process's exit code when it cannot be isolated as the site requires
STEP = b"step:"  # + the step's length in bytes (ASCII): the step itself follows as the next message, read into a
# buffer of that length, so the task process's arrays are writable views of it rather than copies
RESULT_RESERVE = 4096  # bytes of room the task process leaves after its result's header, for the output guard
