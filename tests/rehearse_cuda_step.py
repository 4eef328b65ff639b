"""Run a speedrun script's main() with every torch.compile counted (for tests/test_cuda_rehearsal.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/rehearse_cuda_step.py SCRIPT --rehearse_cuda=1 ...

Compiles with the aot_eager backend: dynamo's tracing and AOT autograd run as on the GPU, without inductor's code
generation (minutes on a CPU; the compiled FlexAttention test covers inductor). After the run each process
prints one line, `rehearsal: {json}`, with the number of compiled frames (in all and by compiled function), graph
breaks and compiled-autograd captures.
"""

import importlib.util
import json
import os
import sys

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters


def main():
    path, argv = sys.argv[1], sys.argv[2:]
    spec = importlib.util.spec_from_file_location("speedrun_rehearsed", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    compile_ = torch.compile  # script.torch is torch: keep the real one
    by_function = {}  # frames compiled for each function (or module) passed to torch.compile, by its name

    def compile_counted(fn, **kwargs):
        mine = CompileCounterWithBackend("aot_eager")
        by_function.setdefault(getattr(fn, "__name__", type(fn).__name__), []).append(mine)
        return compile_(fn, backend=mine, **kwargs)

    script.torch.compile = compile_counted
    script.main(argv)
    frames = {name: sum(c.frame_count for c in cs) for name, cs in by_function.items()}
    line = "rehearsal: " + json.dumps({"frames": sum(frames.values()), "frames_by_function": frames,
                                       "graph_breaks": sum(counters["graph_break"].values()),
                                       "compiled_autograd": sum(counters["compiled_autograd"].values())})
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())  # one write (< PIPE_BUF): the two ranks' lines never mix
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(0)  # as the scripts do: gloo's teardown sometimes aborts after a complete run


if __name__ == "__main__":
    main()
