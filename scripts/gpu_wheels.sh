#!/usr/bin/env bash
# The wheels a GPU machine needs to run benchmarks/gpu_check.py, for CPython 3.12 on manylinux x86-64.
#
#   ./scripts/gpu_wheels.sh [DIR]      (default: gpu-wheels; the folder is emptied first)
#
# The acceptance machine is taken to have torch, lightning, transformers, peft, sentence-transformers and
# tensorboard with their dependencies. The folder gets lit-gcpo's own wheel (built from this checkout) and every
# distribution lit-gcpo needs beyond those: the requirement closure of lit-gcpo minus that of the machine's packages,
# both read from the metadata installed in this checkout's .venv (PYTHON=... for another interpreter), each pinned to
# the version installed here, the versions the tests ran. Left out, with what needs them (gpu_check reports those
# checks as skipped, or does not use them):
#   - datasets and what only it needs (dill, multiprocess, pandas, pyarrow, python-dateutil, tzdata, xxhash): 65.7 MiB
#     of wheels for CPython 3.12 (pyarrow 52.5 MiB), more than the limit by themselves. What needs datasets:
#     HubDataset, and LocalFiles for Parquet and JSON documents; JSONL prompt files, the arithmetic tasks and gpu_check
#     need none of it.
#   - vllm (the extra [vllm], a GPU build of several hundred MiB that pins its own torch): the vllm engine;
#     gpu_check's vllm_engine check is reported as skipped.
#   - the extras [embed] and [dev]: sentence-transformers is on the machine; the test tools are not needed there.
# faiss-cpu is kept although not pure Python (one manylinux wheel, no system library): the embedding clustering of
# GCPO's uncertainty callback needs it. The folder must stay within 60 MiB: the script fails past that.
# It also copies benchmarks/gpu_check.py into the folder and writes INSTALL.txt (the commands on the GPU machine).
# Measured 2026-12-06: 8 wheels, 21.0 MiB in all (faiss-cpu 18.0 MiB, lit-gcpo 1.7 MiB, the rest 1.3 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-gpu-wheels}"
python="${PYTHON:-.venv/bin/python}"
limit_mib=60
machine=(torch lightning transformers peft sentence-transformers tensorboard)
left_out=(datasets vllm)

rm -rf "$out"
mkdir -p "$out"

echo "== lit-gcpo's wheel"
"$python" -m pip wheel --no-deps -q -w "$out" .

echo "== what lit-gcpo needs beyond: ${machine[*]} (left out: ${left_out[*]})"
wheel=$(ls "$out"/lit_gcpo-*.whl)
mapfile -t needed < <(WHEEL="$wheel" MACHINE="${machine[*]}" LEFT_OUT="${left_out[*]}" "$python" - <<'EOF'
import email.parser
import importlib.metadata as metadata
import os
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# the acceptance machine's interpreter, not this one
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}


def applies(requirement, extras):
    marker = requirement.marker
    return marker is None or any(marker.evaluate({**TARGET, "extra": extra}) for extra in extras | {""})


def closure(requirements, stop=frozenset()):
    """Every distribution reachable from requirements (installed metadata) through those that apply on the target,
    not through the names in stop."""
    seen, todo = set(), [(canonicalize_name(r.name), frozenset(r.extras)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        if name in stop or (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            print(f"not installed here, its requirements unknown: {name}", file=sys.stderr)
            continue
        for requirement in map(Requirement, requires):
            if applies(requirement, extras):
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return {name for name, _ in seen}


with zipfile.ZipFile(os.environ["WHEEL"]) as wheel:
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    declared = email.parser.Parser().parsestr(wheel.read(info).decode()).get_all("Requires-Dist")
own = [r for r in map(Requirement, declared) if applies(r, frozenset())]  # no extras
left_out = {canonicalize_name(name) for name in os.environ["LEFT_OUT"].split()}
machine = closure([Requirement(name) for name in os.environ["MACHINE"].split()])
needed = closure(own, stop=left_out) - machine
dropped = closure(own) - machine - needed
print(f"left out with them (nothing else needs these): {', '.join(sorted(dropped))}", file=sys.stderr)
for name in sorted(needed):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
)
printf '   %s\n' "${needed[@]}"

echo "== downloading them (CPython 3.12, manylinux x86-64, wheels only)"
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$out" \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  "${needed[@]}"

cp benchmarks/gpu_check.py "$out/"
name=$(basename "$out")
cat > "$out/INSTALL.txt" <<EOF
On the GPU machine (CPython 3.12 with ${machine[*]}), in the folder that holds $name/:

  pip install --no-index --no-deps $name/*.whl
  python $name/gpu_check.py --out gpu_check.json

--no-deps: lit-gcpo declares datasets, which this folder leaves out (pip check will name it); nothing gpu_check
runs imports it. Left out: ${left_out[*]}.
EOF

size=$(du -sb "$out" | cut -f1)
size_mib=$(awk -v b="$size" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "== $out: $(ls "$out"/*.whl | wc -l) wheels, ${size_mib} MiB (limit ${limit_mib} MiB)"
ls -l "$out"
if [ "$size" -gt $((limit_mib * 1048576)) ]; then
  echo "the folder is over ${limit_mib} MiB" >&2
  exit 1
fi
