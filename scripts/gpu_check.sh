#!/usr/bin/env bash
# The whole check of fst on a GPU machine, in at most about 5 minutes on a bare machine:
#   build    fst with its kernels for sm_90 (nvcc --threads 0); skipped when this tree's build is
#            already installed in build/gpu-site
#   smoke    a small load onto the GPU (torch, safe_open, JAX), bit for bit against safetensors
#   bench    the warm load benchmark: fst beside safetensors, the anchors whose wheels were
#            brought, and the machine's limits (bench/bench_gpu.py load)
#   tests    pytest -m gpu, then tests/test_gds.py against the machine's real cuFile
#   kernels  the conversion kernels against a device-to-device copy and torch's casts
#            (bench/bench_convert.py --device cuda), and whether torch's CUDA casts agree with
#            its CPU casts (bench/bench_gpu.py casts)
#
#   usage: bash scripts/gpu_check.sh [--only build,smoke,bench,tests,kernels] [--out DIR]
#                                    [--wheels DIR] [--size 6GiB] [--total SECONDS] [--rebuild]
#
# Every step runs under `timeout`, each sized from what is left of --total (default 300 s), so
# that a hung step cannot take the later ones' time; pytest runs with --timeout. Results go to
# --out (default $OUT, else ./gpu_out), at most 5 files: summary.json, summary.txt, log.txt (every
# step's output), bench_gpu.json and bench_gpu.md. The summary is printed last, with the command
# that reruns only the steps that failed. The exit status is non-zero when any step failed.
#
# Environment: PYTHON (default python3); FST_CUDA (default ON: the build fails without nvcc);
# FST_CUDA_ARCHS (default 90); FST_BUILD_TIMEOUT (default 150 s); FST_GPU_DEVICE (default
# cuda:0; cpu runs every step on the host, to try the script out without a GPU);
# FST_CONVERT_MIB (default 256); FST_GPU_WHEELS (= --wheels, default gpu_wheels/ when it
# exists).
#
# --wheels DIR holds cp312 wheels the machine lacks: the anchors (instanttensor, fastsafetensors,
# runai-model-streamer and humanize, kvikio-cu13 with libkvikio-cu13 and rapids-logger) and what
# some test modules import (psutil, hypothesis, attrs, sortedcontainers). Fetched beforehand on
# a machine with a registry, one package at a time so that one without a fitting wheel does
# not stop the others:
#   for p in instanttensor fastsafetensors runai-model-streamer humanize kvikio-cu13 \
#            libkvikio-cu13 rapids-logger psutil hypothesis attrs sortedcontainers; do
#     pip download --only-binary=:all: --no-deps --python-version 3.12 -d gpu_wheels \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 "$p"; done
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
t_start=$SECONDS

all_steps=(build smoke bench tests kernels)
only=""
out=${OUT:-gpu_out}
wheels=${FST_GPU_WHEELS:-}
size=6GiB
total=300
rebuild=0
args_seen=()
while [ $# -gt 0 ]; do
  case $1 in
    --only) only=$2; shift 2 ;;
    --only=*) only=${1#*=}; shift ;;
    --out) out=$2; args_seen+=(--out "$2"); shift 2 ;;
    --wheels) wheels=$2; args_seen+=(--wheels "$2"); shift 2 ;;
    --size) size=$2; args_seen+=(--size "$2"); shift 2 ;;
    --total) total=$2; args_seen+=(--total "$2"); shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$wheels" ] && [ -d gpu_wheels ]; then wheels=$repo/gpu_wheels; fi

selected=()
if [ -z "$only" ]; then
  selected=("${all_steps[@]}")
else
  IFS=, read -r -a wanted <<< "$only"
  for w in "${wanted[@]}"; do
    case " ${all_steps[*]} " in
      *" $w "*) ;;
      *) echo "gpu_check.sh: unknown step '$w' (steps: ${all_steps[*]})" >&2; exit 2 ;;
    esac
  done
  for s in "${all_steps[@]}"; do  # always in the fixed order, whatever order --only names
    case ",$only," in *",$s,"*) selected+=("$s") ;; esac
  done
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$repo/build/gpu-check  # step logs and side results; only what is listed above goes to $out
rm -rf "$work"
mkdir -p "$work"
: > "$work/steps.tsv"
: > "$out/log.txt"
rm -f "$out/summary.json" "$out/summary.txt" "$out/bench_gpu.json" "$out/bench_gpu.md"

py=${PYTHON:-python3}
device=${FST_GPU_DEVICE:-cuda:0}
site=$repo/build/gpu-site  # fst is installed here, not into the machine's Python
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# Seconds each step may take at most, and the least each needs to be worth starting. A step's
# timeout is its cap, cut so that the selected steps after it keep their minimum of --total.
declare -A cap=([build]=${FST_BUILD_TIMEOUT:-150} [smoke]=45 [bench]=150 [tests]=120 [kernels]=75)
declare -A least=([build]=60 [smoke]=20 [bench]=40 [tests]=60 [kernels]=30)

step_timeout() {  # step_timeout NAME -> seconds (0: not enough time left)
  local name=$1 after=0 seen=0 s
  for s in "${selected[@]}"; do
    if [ "$seen" = 1 ]; then after=$((after + least[$s])); fi
    if [ "$s" = "$name" ]; then seen=1; fi
  done
  local left=$((total - (SECONDS - t_start) - after))
  local t=${cap[$name]}
  if [ "$left" -lt "$t" ]; then t=$left; fi
  if [ "$t" -lt "${least[$name]}" ]; then t=0; fi
  echo "$t"
}

append_log() {  # a step's log into log.txt, cut to its first 1 and last 2 MiB if longer
  local name=$1 f=$work/$1.log size_b
  size_b=$(wc -c < "$f")
  {
    echo "==================== $name ===================="
    if [ "$size_b" -gt $((3 << 20)) ]; then
      head -c $((1 << 20)) "$f"
      echo; echo "[... $((size_b - (3 << 20))) bytes cut ...]"
      tail -c $((2 << 20)) "$f"
    else
      cat "$f"
    fi
    echo
  } >> "$out/log.txt"
}

# run_step NAME COMMAND...: the command under timeout, its output into the step's log (and the
# last lines on the terminal); a line "name status rc seconds timeout" in steps.tsv.
run_step() {
  local name=$1; shift
  local t; t=$(step_timeout "$name")
  local t0=$SECONDS
  echo "== $name (timeout ${t}s, $((SECONDS - t_start))s elapsed)"
  if [ "$t" = 0 ]; then
    echo "not started: out of time (--total $total)" > "$work/$name.log"
    printf '%s\tout of time\t-\t0\t0\n' "$name" >> "$work/steps.tsv"
    append_log "$name"
    echo "   out of time"
    return
  fi
  # --kill-after: a step that ignores SIGTERM is killed 5 s later.
  timeout --kill-after=5 "$t" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$t" >> "$work/steps.tsv"
  append_log "$name"
  tail -n 8 "$work/$name.log" | sed 's/^/   /'
  echo "   -> $status ($((SECONDS - t0))s)"
}

# ---- the machine, recorded before anything runs -------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  echo "kernel: $(uname -r)"
  echo "cpus: $(nproc)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  nvcc --version 2>&1 | tail -1 | sed 's/^/nvcc: /'
  $py -c "import sys, torch; print('python:', sys.version.split()[0]); print('torch:', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  for d in "$repo" /tmp /var/tmp "$HOME"; do echo "filesystem $d: $(stat -f -c %T "$d" 2>&1)"; done
  [ -n "$wheels" ] && echo "wheels: $wheels: $(ls "$wheels" 2>&1 | tr '\n' ' ')"
  echo "steps: ${selected[*]}"
} > "$work/machine.txt" 2>&1
cat "$work/machine.txt"

# ---- steps ----------------------------------------------------------------------------------
# A digest of everything the build reads: an installed build of the same digest is this tree's.
source_digest() {
  find cpp src/fst CMakeLists.txt pyproject.toml -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z \
    | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

do_build() {
  local digest; digest=$(source_digest)
  if [ "$rebuild" = 0 ] && [ -f "$site/.fst-digest" ] && [ "$(cat "$site/.fst-digest")" = "$digest" ] \
     && $py -c "import fst, sys; sys.exit(0 if fst._core.HAVE_KERNELS else 1)" 2>/dev/null; then
    echo "fst of this tree ($digest) is already built with its kernels in $site: build skipped"
    check_import
    return
  fi
  rm -rf "$site"
  # The kernels for the H200 alone, nvcc compiling its parts on all cores: the rest of the
  # build runs in parallel with ninja. --target keeps the machine's own Python untouched.
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) FST_CUDA=${FST_CUDA:-ON} $py -m pip install \
    --no-build-isolation --no-deps --no-index --target "$site" \
    -Ccmake.define.FST_CUDA_ARCHS="${FST_CUDA_ARCHS:-90}" \
    "-Ccmake.define.FST_NVCC_FLAGS=--threads 0" \
    -Cbuild-dir=build/gpu-check-build . || return 1
  echo "$digest" > "$site/.fst-digest"
  check_import
}

# The later steps must test this build: an fst installed elsewhere that wins over PYTHONPATH
# (an editable install's import hook does) would make them test another.
check_import() {
  $py -c "
import sys, fst
print(fst.__file__, 'kernels:', fst._core.HAVE_KERNELS)
if not fst.__file__.startswith('$site/'):
    sys.exit('fst imports from ' + fst.__file__ + ', not from $site: another installation shadows this build')
"
}

do_tests() {
  local rc=0 deps=$repo/build/gpu-testdeps w
  # Some test modules import hypothesis or psutil, which the GPU machine may lack: their wheels
  # come in the --wheels folder and go into a folder of their own for this step.
  if ! $py -c "import hypothesis, psutil" 2>/dev/null && [ -n "$wheels" ]; then
    for w in psutil hypothesis attrs sortedcontainers; do
      $py -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$deps" "$w" \
        || echo "no installable $w wheel in $wheels"
    done
    export PYTHONPATH=$deps:$PYTHONPATH
  fi
  $py -c "import hypothesis, psutil" 2>/dev/null \
    || echo "hypothesis or psutil missing: the test modules that import them cannot load (bring their wheels with --wheels)"
  # The header names the O_DIRECT folder the GDS tests used; -rfEs lists every failure, error
  # and skip with its reason. A module that cannot load fails the step but does not keep the
  # other modules' tests from running.
  $py -m pytest -m gpu tests -p no:cacheprovider --timeout 60 -rfEs --continue-on-collection-errors || rc=1
  $py -m pytest tests/test_gds.py -p no:cacheprovider --timeout 60 -rfEs || rc=1
  return $rc
}

do_kernels() {
  local rc=0
  # 256 MiB per conversion: far past the GPU's caches, and quick to generate on the host.
  $py bench/bench_convert.py --device "$device" --mib "${FST_CONVERT_MIB:-256}" --repeats 5 || rc=1
  $py bench/bench_gpu.py casts --device "$device" --out "$work" || rc=1
  return $rc
}

for s in "${selected[@]}"; do
  case $s in
    build) export -f do_build source_digest check_import; export py site rebuild
           run_step build bash -c do_build ;;
    smoke) run_step smoke "$py" bench/bench_gpu.py smoke --device "$device" --out "$work" ;;
    bench)
      t=$(step_timeout bench)
      # The benchmark skips what would pass its own deadline, so that it ends with its results
      # written instead of being cut off by the step's timeout.
      run_step bench "$py" bench/bench_gpu.py load --device "$device" --size "$size" --files 3 \
        ${wheels:+--wheels "$wheels"} --deadline $((t > 15 ? t - 10 : 5)) --out "$out" ;;
    tests) export -f do_tests; export py repo wheels; run_step tests bash -c do_tests ;;
    kernels) export -f do_kernels; export py device work; run_step kernels bash -c do_kernels ;;
  esac
done

# ---- summary --------------------------------------------------------------------------------
rerun_steps=$(awk -F'\t' '$2 != "ok" {print $1}' "$work/steps.tsv" | paste -sd, -)
rerun=""
if [ -n "$rerun_steps" ]; then
  # A rerun is on a fresh machine: the build comes first again (and is skipped where it exists).
  case ",$rerun_steps," in *,build,*) ;; *) rerun_steps="build,$rerun_steps" ;; esac
  rerun="bash scripts/gpu_check.sh --only $rerun_steps"
  for a in "${args_seen[@]}"; do rerun+=" $(printf '%q' "$a")"; done
fi
export rerun total
export elapsed=$((SECONDS - t_start))
$py - "$work" "$out" <<'EOF' || { echo "summary failed; steps:"; cat "$work/steps.tsv"; }
import json, os, re, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])


def load(p):
    try:
        return json.loads(Path(p).read_text())
    except Exception:
        return None


def log(name):
    p = work / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, limit = line.split("\t")
    steps.append({"step": name, "status": status, "exit": rc, "seconds": int(secs), "timeout": int(limit)})
summary = {"ok": all(s["status"] == "ok" for s in steps), "elapsed_s": int(os.environ["elapsed"]),
           "total_budget_s": int(os.environ["total"]), "steps": steps, "rerun": os.environ.get("rerun") or None,
           "machine": (work / "machine.txt").read_text(errors="replace").splitlines()}
text = []

names = [s["step"] for s in steps]
if "build" in names:
    m = re.search(r"^(\S+) kernels: (\S+)$", log("build"), re.M)
    summary["build"] = {"fst": m.group(1) if m else None, "kernels": m.group(2) if m else None,
                        "skipped": "build skipped" in log("build")}
if "smoke" in names:
    summary["smoke"] = load(work / "smoke.json")
if "bench" in names:
    b = load(out / "bench_gpu.json")
    if b:
        summary["bench"] = {"data": b["data"], "cold": b.get("cold"), "skipped": b["skipped"], "rows": [
            {k: r.get(k) for k in ("loader", "mode", "status", "first_GBps", "median_GBps", "further_calls",
                                   "backend", "error")} for r in b["rows"]]}
if "tests" in names:
    t = log("tests")
    summary["tests"] = {
        "o_direct_folder": sorted(set(re.findall(r"^O_DIRECT folder: (.*)$", t, re.M))),
        "results": re.findall(r"^=+ (.*\b(?:passed|failed|error|errors|skipped|deselected|no tests ran)\b.*) =+$", t, re.M),
        "failed": (re.findall(r"^(?:FAILED|ERROR) (\S+)", t, re.M)
                   or re.findall(r"^_+ ERROR collecting (\S+) _+$", t, re.M))[:40],
        "notes": re.findall(r"^(hypothesis or psutil missing.*|no installable .*)$", t, re.M),
        "skipped": re.findall(r"^SKIPPED (.*)$", t, re.M)[:40],
    }
if "kernels" in names:
    k = log("kernels")
    rows = []
    for m in re.finditer(r"^((?:fst|torch cast|copy) .*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", k, re.M):
        rows.append({"what": m.group(1).strip(), "ms": float(m.group(2)), "traffic_GBps": float(m.group(3)),
                     "vs_copy": float(m.group(4))})
    casts = load(work / "casts.json")
    summary["kernels"] = {"convert": rows, "gpu": (re.findall(r"^GPU: (.*)$", k, re.M) or [None])[0]}
    if casts:
        summary["kernels"]["torch_cuda_casts_vs_cpu"] = {
            "torch": casts["torch"], "pairs_checked": casts["pairs_checked"], "pairs_agree": casts["pairs_agree"],
            "values_disagree": casts["values_disagree"], "pairs_failed": casts.get("pairs_failed", []),
            "disagreeing_pairs": [p for p in casts["pairs"] if p["disagree"]]}

(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")

# The text summary: what a person reads first.
text.append("fst GPU check: " + ("all steps ok" if summary["ok"] else "SOME STEPS FAILED")
            + f" ({summary['elapsed_s']} s of {summary['total_budget_s']} s)")
text += [l for l in summary["machine"] if l.startswith(("gpu:", "torch:", "cpus:", "date:"))]
text.append("")
for s in steps:
    text.append(f"  {s['step']:<8} {s['status']:<12} {s['seconds']:>4} s (timeout {s['timeout']} s)")
    if s["status"] != "ok":  # the end of its log says why
        text += [f"    | {l[:160]}" for l in log(s["step"]).strip().splitlines()[-3:]]
if summary.get("build"):
    text.append(f"build: kernels {summary['build']['kernels']}" + (" (existing build)" if summary["build"]["skipped"] else ""))
sm = summary.get("smoke")
if sm and sm.get("runtime_info"):
    ri = sm["runtime_info"]
    if isinstance(ri, dict):
        gb = ri.get("gpu_backend") or {}
        text.append(f"fst runtime: GPU loads use {gb.get('backend')} ({gb.get('reason')})"[:300])
    else:
        text.append(f"fst runtime_info: {ri}"[:300])
if sm:
    text.append("smoke: " + ", ".join(f"{c['what']} {'ok' if c['ok'] else 'FAILED'}"
                                      + (f" [{c.get('backend')}]" if c.get("backend") else "") for c in sm["checks"]))
    for c in sm["checks"]:
        if not c["ok"]:
            text.append(f"  {c['what']}: {c.get('error') or ('mismatched ' + ', '.join(c.get('mismatched', [])))}")
bn = summary.get("bench")
if bn:
    d = bn["data"]
    text.append(f"bench: {d['tensor_bytes'] / 1e9:.2f} GB BF16 in {d['files']} files on {d['fstype']}; GB/s first / median:")
    for r in bn["rows"]:
        if r["status"] == "ok":
            med = f"{r['median_GBps']:.2f}" if r.get("median_GBps") else "-"
            text.append(f"  {r['loader']:<24} {r['mode']:<4} {r['first_GBps']:7.2f} / {med:>7}"
                        + (f"  [{r['backend']}]" if r.get("backend") else ""))
        else:
            text.append(f"  {r['loader']:<24} {r['mode']:<4} {r['status']}: {str(r.get('error'))[:150]}")
    for s in bn["skipped"]:
        text.append(f"  {s['loader']:<24} skipped: {s['reason'][:120]}")
    if bn.get("cold"):
        text.append(f"  cold: {'measured' if bn['cold']['works'] else 'not measured'} ({bn['cold']['how']})"
                    + (f"; doubt: {bn['cold']['doubt']}" if bn["cold"].get("doubt") else ""))
ts = summary.get("tests")
if ts:
    text.append("tests: " + " | ".join(ts["results"]) + (f"; O_DIRECT folder: {'; '.join(ts['o_direct_folder'])}" if ts["o_direct_folder"] else ""))
    text += [f"  {n}" for n in ts["notes"]]
    text += [f"  FAILED {f}" for f in ts["failed"][:15]]
    text += [f"  SKIPPED {s[:150]}" for s in ts["skipped"][:10]]
kn = summary.get("kernels")
if kn:
    text.append(f"kernels ({kn['gpu']}): traffic GB/s, share of a device copy (target: fst >= 0.80)")
    for r in kn["convert"]:
        if not r["what"].startswith("copy"):
            low = r["what"].startswith("fst") and r["vs_copy"] < 0.8
            text.append(f"  {r['what']:<26} {r['traffic_GBps']:8.1f}  {r['vs_copy']:.2f}" + ("  below target" if low else ""))
    c = kn.get("torch_cuda_casts_vs_cpu")
    if c:
        text.append(f"  torch {c['torch']} CUDA .to() vs CPU .to(): {c['pairs_agree']} of {c['pairs_checked']} pairs agree, "
                    f"{c['values_disagree']} values differ" + (f"; {len(c['pairs_failed'])} pairs failed" if c["pairs_failed"] else ""))
        if c["pairs_failed"]:
            first = next(p for p in casts["pairs"] if p["disagree"] is None)
            text.append(f"    e.g. {first['src']} -> {first['dst']}: {first['error'][:150]}")
        for p in c["disagreeing_pairs"]:
            text.append(f"    {p['src']} -> {p['dst']}: {p['disagree']} differ ({p['disagree_nan_payload_only']} NaN payloads only), "
                        f"e.g. {p.get('examples', [])[:2]}")
if summary["rerun"]:
    text.append("")
    text.append(f"rerun the failed steps: {summary['rerun']}")
(out / "summary.txt").write_text("\n".join(text) + "\n")
EOF

echo
echo "==================== summary ($out) ===================="
cat "$out/summary.txt" 2>/dev/null || cat "$work/steps.tsv"
[ -z "$rerun" ]
