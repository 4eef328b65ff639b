"""Run a speedrun script's main() with every torch.compile counted (for tests/test_cuda_rehearsal.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/rehearse_cuda_step.py SCRIPT --rehearse_cuda=1 ...

Compiles with the aot_eager backend: dynamo's tracing and AOT autograd run as on the GPU, without inductor's code
generation (minutes on a CPU; the compiled FlexAttention test covers inductor). After the run each process
prints one line, `rehearsal: {json}`, with the number of compiled frames, graph breaks and compiled-autograd captures.
"""

import functools
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
    counter = CompileCounterWithBackend("aot_eager")
    script.torch.compile = functools.partial(torch.compile, backend=counter)

    script.main(argv)
    print("rehearsal: " + json.dumps({"frames": counter.frame_count,
                                      "graph_breaks": sum(counters["graph_break"].values()),
                                      "compiled_autograd": sum(counters["compiled_autograd"].values())}), flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(0)  # as the scripts do: gloo's teardown sometimes aborts after a complete run


if __name__ == "__main__":
    main()
