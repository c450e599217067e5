#!/usr/bin/env bash
# Builds .whl/: the Python packages albef-ray needs that the nvidia-h200 machine lacks, as
# cp312 manylinux wheels it can install offline (it has torch, transformers, pyarrow, pandas,
# aiohttp, grpcio, msgpack, protobuf, ... but no pydantic, no ray, no mlflow).
#
#   bash benchmarks/gpu_wheels.sh            # once, here (needs pip's index); ~48 MiB
#
# ray 2.60.0's wheel is 76 MiB, over what a device call carries (64 MiB with the tree), so it
# is re-packed without what a one-node Python run never loads: ray/jars (Java workers,
# 31 MiB compressed), RLlib, Serve, ray.llm and the dashboard's web client. MLflow is not
# carried (mlflow-skinny plus its ~20 missing dependencies, and SQLAlchemy for the sqlite
# store): the suite runs Ray Train with tracking.enabled=false. .whl/ is git-ignored through
# .git/info/exclude; never commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# pydantic: albef_ray.config (everything builds its config through it). typing-extensions:
# pydantic 2.14 needs >= 4.16. jsonschema & co.: ray's runtime-env
# validation imports it.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
if ! ls .whl/ray-2.60.0-*.whl >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
        -d "$tmp" ray==2.60.0
    "$PY" - "$tmp"/ray-2.60.0-*.whl .whl <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path

src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
record = next(n for n in zipfile.ZipFile(src).namelist() if n.endswith(".dist-info/RECORD"))
rows = []
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out_dir / src.name, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for info in zin.infolist():
        if info.filename.startswith(DROP) or info.filename == record:
            continue
        data = zin.read(info)
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    rows.append(f"{record},,")
    zout.writestr(record, "\n".join(rows) + "\n")
print(f"{out_dir / src.name}: {(out_dir / src.name).stat().st_size / 2**20:.1f} MiB (from {src.stat().st_size / 2**20:.1f})")
EOF
    rm -rf "$tmp"
fi
du -ch .whl/*.whl | tail -1
