#!/usr/bin/env bash
# Fetch the peers' wheels listed in benchmarks/wheels.txt into .whl/<group>/ for the GPU machine
# (no network there), then slim the two large ones so that everything travels in one device call
# (64 MiB). Run here, in the repo root or anywhere: it cds to the repo.
#   bash benchmarks/fetch_wheels.sh            # all groups
#   bash benchmarks/fetch_wheels.sh base       # one group
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLAT=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=($(sed -n 's/^\[\(.*\)\]$/\1/p' benchmarks/wheels.txt))
for g in "${groups[@]}"; do
  pkgs=$(awk -v g="[$g]" '/^\[/{on=($0==g); next} on && NF && $1 !~ /^#/ {print $1}' benchmarks/wheels.txt)
  mkdir -p ".whl/$g"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q "${PLAT[@]}" -d ".whl/$g" $pkgs
done

# Slim: drop files from a wheel and their RECORD lines (pip installs what is listed and present).
"$PY" - <<'PY'
import glob, os, re, zipfile
DROP = {
    # bitsandbytes: CUDA 11.8-12.8 and ROCm builds; keep libbitsandbytes_cuda13x.so and the CPU one.
    "bitsandbytes-*.whl": re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+)\.so$"),
    # unsloth: the Studio web app (frontend, backend) except the vendored code the library reads.
    "unsloth-2*.whl": re.compile(r"^studio/(frontend/|backend/(?!vendor/))"),
}
for pattern, rx in DROP.items():
    for path in glob.glob(f".whl/*/{pattern}"):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not any(rx.search(n) for n in names):
                continue  # already slim
            tmp = path + ".tmp"
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
                for n in names:
                    if rx.search(n):
                        continue
                    data = z.read(n)
                    if n.endswith(".dist-info/RECORD"):
                        lines = data.decode().splitlines()
                        data = ("\n".join(l for l in lines if not rx.search(l.split(",")[0])) + "\n").encode()
                    out.writestr(z.getinfo(n), data)
        os.replace(tmp, path)
        print(f"slimmed {path}: {os.path.getsize(path) / 2**20:.1f} MiB")
PY
du -sh .whl/* 2>/dev/null || true
