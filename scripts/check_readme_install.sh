#!/usr/bin/env bash
# Follows README.md's "## Install" block literally in a fresh venv, then checks the result:
#   scripts/check_readme_install.sh [TORCH_SPEC]      (default: torch, as the README says)
# The README's first line (`pip install torch ...`) is replaced by `pip install TORCH_SPEC`
# when one is given (e.g. torch==2.13.0 for the CPU build of torch on this machine; plain
# `torch` resolves to a CUDA build). The remaining lines run as written, from a copy of
# this checkout (git archive of HEAD, so nothing built here leaks in). Then, in that venv:
# import, the recorded torch version, and one forward+backward of the op against the
# dense reference; with a CUDA build of torch, also that the CUDA kernels are registered.
# Slow (a full, non-editable build): run by hand before a release, not by `make test`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
torch_spec="${1:-}"
work="$(mktemp -d /tmp/longreach-install.XXXXXX)"
echo "check_readme_install: working in $work"

git -C "$root" archive --format=tar HEAD | (mkdir -p "$work/src" && tar -x -C "$work/src")
python3 -m venv "$work/venv"
source "$work/venv/bin/activate"

# The README's install block: the lines between ```bash and ``` after "## Install".
block="$(awk '/^## Install/{s=1} s&&/^```bash/{b=1;next} b&&/^```/{exit} b' "$root/README.md")"
[[ -n "$block" ]] || { echo "check_readme_install: no bash block under '## Install' in README.md" >&2; exit 1; }
cd "$work/src"
while IFS= read -r line; do
  cmd="${line%%#*}"                       # drop the comment
  [[ -z "${cmd// }" ]] && continue
  if [[ -n "$torch_spec" && "$cmd" =~ ^pip\ install\ torch\ *$ ]]; then
    cmd="pip install $torch_spec"
  fi
  echo "+ $cmd"
  start=$(date +%s)
  eval "$cmd"
  echo "  ($(( $(date +%s) - start )) s)"
done <<< "$block"

cd "$work"   # import the installed package, not the source folder
python - <<'EOF'
import torch
import longreach
from longreach import _build_config

print("torch", torch.__version__, "| built against", _build_config.TORCH_VERSION, "| longreach", longreach.__version__)
q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
out = longreach.local_attention(q, k, v, window=(8, 0), causal=True)
ref = longreach.reference.local_attention(q, k, v, window=(8, 0), causal=True)
torch.testing.assert_close(out, ref)
grads = torch.autograd.grad(out.square().sum(), (q, k, v))
ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
for g, r in zip(grads, ref_grads):
    torch.testing.assert_close(g, r)
if torch.version.cuda:
    has_cuda = bool(_build_config.WITH_CUDA_KERNELS) and torch._C._dispatch_has_kernel_for_dispatch_key(
        "longreach::local_attention_fwd", "CUDA")
    print("CUDA build of torch", torch.version.cuda, "| CUDA kernels registered:", has_cuda)
    assert has_cuda, "torch is a CUDA build and nvcc is here, but the CUDA kernels were not built"
print("check_readme_install: ok")
EOF
