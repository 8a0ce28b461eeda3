"""Merge benchmark: ``mmcompose compose`` against ``mergekit-yaml`` and a plain copy.

Generates three seeded random Llama checkpoints (``base``, ``ft1``, ``ft2``; the fine-tunes are
``base`` plus small noise) as Hugging Face folders (``config.json`` + sharded safetensors with an
index, written tensor by tensor so the generator stays small), then runs the same ``linear``
and ``ties`` merges (one YAML in mergekit's schema) with both tools, each in its own
subprocess, interleaved over ``--repeats``. For every run it records wall time and the child's
peak RSS (``ru_maxrss`` from ``wait4``, plus the peak anonymous / file-backed RSS polled from
``/proc/PID/status``). A third contender reads every input shard fully and writes as many
bytes as one output model: the I/O limit. Outputs of the two tools are compared tensor by
tensor (max abs diff). ``--sweep`` repeats the runs at several model sizes to show how peak RSS
grows as the model doubles.

    python benchmarks/merge.py                       # 1 GB models, 3 repeats, sweep 0.25..2 GB
    python benchmarks/merge.py --size-gb 0.25 --repeats 1 --sweep ''   # quick
    python benchmarks/merge.py --shape 7b --layers 4 --sweep ''        # Llama-2-7B shapes
    python benchmarks/merge.py --size-gb 0.25 --methods ties --ties-repeats 3 --sweep '' \
        --tools mmcompose,mmcompose-sort,mergekit,copy   # selection vs the sort of before

The ``mmcompose-sort`` contender is mmcompose with ``mmcompose.compose.selection.SELECTION =
"sort"``, the full sort that magnitude selection used before; its output must be
bit-identical to mmcompose's (reported as ``<method>/sort`` in the agreement).

mergekit is LGPL and only a benchmark/test tool here: it runs as an external command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # torch is imported lazily: the copy baseline must not pay for it
    import torch

MB = 1 << 20
GB = 1 << 30
# mmcompose-sort: mmcompose with the magnitude selection of before (a full sort), for A/B runs
# mmcompose-before: another checkout's ``src`` (``--before DIR``), for before/after A/B runs
TOOLS = ("mmcompose", "mmcompose-sort", "mmcompose-before", "mergekit", "copy")
OURS = ("mmcompose", "mmcompose-sort", "mmcompose-before")
METHODS = ("linear", "ties")

# ---------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order ``save_pretrained`` writes a LlamaForCausalLM."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def nbytes(self, elem: int = 2) -> int:
        return sum(math.prod(s) for _, s in self.tensors()) * elem

    def hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


LLAMA2_7B = LlamaShape(
    hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000
)


def shape_for(size_gb: float, hidden: int, layers: int | None) -> LlamaShape:
    """A Llama of about ``size_gb`` GiB in bf16 at a fixed width: only the depth varies, so the
    largest tensor (the embedding) is the same at every size and RSS can be compared."""
    heads = max(1, hidden // 128)
    base = LlamaShape(hidden, round(hidden * 2.6875 / 256) * 256, 0, heads, heads, 32000)
    if layers is None:
        per_layer = LlamaShape(**{**asdict(base), "layers": 1}).nbytes() - base.nbytes()
        layers = max(1, round((size_gb * GB - base.nbytes()) / per_layer))
    return LlamaShape(**{**asdict(base), "layers": layers})


# ---------------------------------------------------------------- writing checkpoints


def _safetensors_header(specs: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in specs:
        n = math.prod(shape) * 2
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor(role: int, k: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Tensor ``k`` of model ``role`` (0 = base, 1.. = fine-tunes of it), deterministic."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    if len(shape) == 1:  # norms: near 1
        t = 1.0 + 0.01 * torch.randn(shape, generator=g)
    else:
        t = torch.randn(shape, generator=g).mul_(0.02)
    if role:
        g.manual_seed(seed * 1_000_003 + k + role * 7_919_000)
        t.add_(torch.randn(shape, generator=g).mul_(0.002))
    return t.to(torch.bfloat16)


def write_checkpoint(folder: Path, shape: LlamaShape, role: int, seed: int, shard: int) -> None:
    """An HF folder as ``save_pretrained`` writes it, one tensor in memory at a time."""
    import torch

    from mmcompose.io import plan_shards

    folder.mkdir(parents=True)
    specs = shape.tensors()
    sizes = ((str(k), math.prod(shape) * 2) for k, (_, shape) in enumerate(specs))
    groups = [[int(k) for k in g] for g in plan_shards(sizes, shard)]  # bf16 bytes
    n = len(groups)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map: dict[str, str] = {}
    for fname, group in zip(files, groups, strict=True):
        sub = [specs[k] for k in group]
        with open(folder / fname, "wb") as f:
            f.write(_safetensors_header(sub))
            for k in group:
                t = _tensor(role, k, specs[k][1], seed)
                f.write(t.view(torch.int16).numpy().tobytes())
                weight_map[specs[k][0]] = fname
    if n > 1:
        index = {"metadata": {"total_size": shape.nbytes()}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))


def merge_config(method: str, models: dict[str, Path]) -> dict[str, Any]:
    """The mergekit-schema YAML both tools read."""
    if method == "linear":
        weights = {"base": 0.5, "ft1": 0.3, "ft2": 0.2}
        return {
            "merge_method": "linear",
            "models": [
                {"model": str(models[m]), "parameters": {"weight": w}} for m, w in weights.items()
            ],
            "dtype": "bfloat16",
        }
    return {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(models["ft2"]), "parameters": {"weight": 0.5, "density": 0.3}},
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }


# ---------------------------------------------------------------- the copy baseline


def copy_baseline(inputs: Sequence[Path], out: Path, out_bytes: int, chunk: int = 64 * MB) -> None:
    """Read every input shard fully; write ``out_bytes`` (one model) of what was read."""
    out.mkdir(parents=True)
    buf = bytearray(chunk)
    view = memoryview(buf)
    left = out_bytes
    with open(out / "copy.bin", "wb") as dst:
        for folder in inputs:
            for f in sorted(folder.glob("*.safetensors")):
                with open(f, "rb", buffering=0) as src:
                    while n := src.readinto(buf):
                        if left > 0:
                            w = min(n, left)
                            dst.write(view[:w])
                            left -= w
        while left > 0:  # never reached: inputs hold 3 models' bytes
            w = min(chunk, left)
            dst.write(view[:w])
            left -= w


# ---------------------------------------------------------------- measuring a child


@dataclass
class Run:
    tool: str
    method: str
    size_gb: float
    repeat: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    peak_anon_mb: float
    peak_file_mb: float
    polled_hwm_mb: float
    returncode: int
    cache: str
    stderr_tail: str = ""


def _status_kb(pid: int, keys: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd: Sequence[str], env: dict[str, str], interval: float = 0.02) -> dict[str, Any]:
    """Run ``cmd``; its wall time, ``ru_maxrss`` (via wait4) and polled peak anon/file RSS."""
    errf = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errf)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for k, v in _status_kb(proc.pid, tuple(peaks)).items():
                peaks[k] = max(peaks[k], v)
            done.wait(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    errf.seek(0)
    tail = errf.read().decode(errors="replace")[-2000:]
    errf.close()
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_mb": usage.ru_maxrss / 1024,
        "peak_anon_mb": peaks["RssAnon"] / 1024,
        "peak_file_mb": peaks["RssFile"] / 1024,
        "polled_hwm_mb": peaks["VmHWM"] / 1024,
        "returncode": proc.returncode,
        "stderr_tail": tail if proc.returncode else "",
    }


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache (root only); True when it worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cli_has_compose() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "mmcompose", "compose", "--help"], capture_output=True, text=True
    )
    return r.returncode == 0 and "--force" in r.stdout


OURS_RUNNER = (
    "import sys\nfrom mmcompose.compose import run_from_yaml\n"
    "run_from_yaml(sys.argv[1], sys.argv[2], progress=False)\n"
)
# The CLI (or the runner), with mmcompose.compose.selection.SELECTION = "sort" set first.
SORT_PRELUDE = "import mmcompose.compose.selection as s; s.SELECTION = 'sort'\n"
CLI_RUNNER = "import runpy, sys\nsys.argv[0] = 'mmcompose'\nrunpy.run_module('mmcompose', run_name='__main__')\n"


def commands(
    tool: str, cfg: Path, out: Path, args: argparse.Namespace, models: list[Path], use_cli: bool
) -> list[str]:
    if tool == "mmcompose-before":  # the same CLI from another checkout's src
        code = f"import sys; sys.path.insert(0, {str(args.before)!r})\n" + CLI_RUNNER
        return [sys.executable, "-c", code, "compose", str(cfg), "-o", str(out)]
    if tool == "mmcompose":
        if use_cli:
            return [sys.executable, "-m", "mmcompose", "compose", str(cfg), "-o", str(out)]
        return [sys.executable, "-c", OURS_RUNNER, str(cfg), str(out)]
    if tool == "mmcompose-sort":
        if use_cli:
            code = SORT_PRELUDE + CLI_RUNNER
            return [sys.executable, "-c", code, "compose", str(cfg), "-o", str(out)]
        return [sys.executable, "-c", SORT_PRELUDE + OURS_RUNNER, str(cfg), str(out)]
    if tool == "mergekit":
        shard_params = args.out_shard_mb * MB // 2  # bf16 output: 2 bytes per parameter
        return [
            shutil.which("mergekit-yaml") or "mergekit-yaml",
            str(cfg),
            str(out),
            "--out-shard-size",
            str(shard_params),
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
            *args.mergekit_args.split(),
        ]
    out_bytes = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
    return [
        sys.executable,
        __file__,
        "--_copy",
        str(out),
        str(out_bytes),
        *map(str, models),
    ]


# ---------------------------------------------------------------- comparing outputs


def _weights(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    return dict.fromkeys(_keys(folder / "model.safetensors"), folder / "model.safetensors")


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return list(f.keys())


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Max abs diff per tensor (float32) between two HF folders, read one tensor at a time."""
    from safetensors import safe_open

    a, b = _weights(ours), _weights(theirs)
    diffs: dict[str, float] = {}
    mismatched: list[str] = []
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            mismatched.append(f"{name}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}")
            continue
        diffs[name] = float((ta.float() - tb.float()).abs().max())
    worst = max(diffs, key=diffs.__getitem__) if diffs else None
    return {
        "tensors_compared": len(diffs),
        "only_ours": sorted(set(a) - set(b)),
        "only_mergekit": sorted(set(b) - set(a)),
        "mismatched": mismatched,
        "max_abs_diff": diffs[worst] if worst else None,
        "worst_tensor": worst,
        "exact_tensors": sum(d == 0 for d in diffs.values()),
        "per_tensor_max_abs_diff": diffs,
    }


def compare_in_child(ours: Path, theirs: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_compare", str(ours), str(theirs), str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


# ---------------------------------------------------------------- the benchmark


@dataclass
class SizeResult:
    size_gb: float
    shape: dict[str, Any]
    model_bytes: int
    input_shards: int
    runs: list[Run] = field(default_factory=list)
    agreement: dict[str, Any] = field(default_factory=dict)


def bench_size(
    work: Path,
    shape: LlamaShape,
    label_gb: float,
    repeats: dict[str, int],
    args: argparse.Namespace,
    use_cli: bool,
) -> SizeResult:
    tag = f"{label_gb:g}gb"
    root = work / tag
    stamp = json.dumps([asdict(shape), args.seed, args.in_shard_mb])
    reuse = args.reuse and (root / "models.json").is_file()
    if reuse and (root / "models.json").read_text() != stamp:
        reuse = False
    if root.exists() and not reuse:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = {}
    for role, name in enumerate(("base", "ft1", "ft2")):
        models[name] = root / name
        if reuse:
            continue
        # In a child: this process stays small (no torch), so the children it forks for the
        # runs do not inherit a large RSS into their ru_maxrss.
        spec = json.dumps([asdict(shape), role, args.seed, args.in_shard_mb * MB])
        subprocess.run(
            [sys.executable, __file__, "--_generate", str(models[name]), spec], check=True
        )
    (root / "models.json").write_text(stamp)
    nshards = len(list(models["base"].glob("*.safetensors")))
    print(
        f"[{tag}] generated 3 x {shape.nbytes() / GB:.2f} GiB ({shape.layers} layers, "
        f"{nshards} shard(s) each) in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    res = SizeResult(label_gb, asdict(shape), shape.nbytes(), nshards)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cfgs = {}
    for method in repeats:
        cfg = merge_config(method, models)
        (root / f"{method}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        # Ours: same YAML plus the output shard cap (mergekit takes it on the command line).
        ours = cfg | {"max_shard_size": f"{args.out_shard_mb}MiB"}
        (root / f"{method}-mmcompose.yaml").write_text(yaml.safe_dump(ours, sort_keys=False))
        cfgs[method] = {
            "mmcompose": root / f"{method}-mmcompose.yaml",
            "mmcompose-sort": root / f"{method}-mmcompose.yaml",
            "mmcompose-before": root / f"{method}-mmcompose.yaml",
            "mergekit": root / f"{method}.yaml",
            "copy": root / f"{method}.yaml",
        }
    inputs = [models["base"], models["ft1"], models["ft2"]]
    for rep in range(max(repeats.values())):
        active = [m for m, n in repeats.items() if rep < n]
        for method in active:
            for tool in args.tools:
                if tool == "copy" and method != active[0]:
                    continue  # the copy does not depend on the method: once per repeat
                out = root / f"out-{tool}-{method}"
                if out.exists():
                    shutil.rmtree(out)
                cold = args.cache == "cold" and drop_caches()
                if args.cache == "warm":
                    os.sync()
                cmd = commands(tool, cfgs[method][tool], out, args, inputs, use_cli)
                m = measure(cmd, env)
                label = "copy" if tool == "copy" else method
                run = Run(tool, label, label_gb, rep, cache="cold" if cold else "warm", **m)
                res.runs.append(run)
                print(
                    f"[{tag}] rep {rep} {method:6s} {tool:9s} {run.wall_s:7.2f} s  "
                    f"maxrss {run.maxrss_mb:7.0f} MB  anon {run.peak_anon_mb:7.0f} MB  "
                    f"file {run.peak_file_mb:7.0f} MB  rc {run.returncode}",
                    flush=True,
                )
                if run.returncode:
                    print(run.stderr_tail, file=sys.stderr)
            a = root / f"out-mmcompose-{method}"
            # ours vs mergekit under the method's name; vs the sort-based selection as "/sort"
            others = (
                (method, "mergekit"),
                (f"{method}/sort", "mmcompose-sort"),
                (f"{method}/before", "mmcompose-before"),
            )
            for key, other in others:
                b = root / f"out-{other}-{method}"
                if rep != 0 or not (a.is_dir() and b.is_dir()):
                    continue
                cmp_file = root / f"cmp-{key.replace('/', '-')}.json"
                ag = res.agreement[key] = compare_in_child(a, b, cmp_file)
                print(
                    f"[{tag}] {key}: {ag['tensors_compared']} tensors, max abs diff "
                    f"{ag['max_abs_diff']} ({ag['worst_tensor']}), {ag['exact_tensors']} exact",
                    flush=True,
                )
            for tool in args.tools:
                shutil.rmtree(root / f"out-{tool}-{method}", ignore_errors=True)
    if not (args.keep or args.reuse):
        shutil.rmtree(root)
    return res


def _median(runs: list[Run], tool: str, method: str, key: str) -> float | None:
    vals = [
        getattr(r, key) for r in runs if r.tool == tool and r.method == method and not r.returncode
    ]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(res: SizeResult) -> str:
    """Medians for one size: time, throughput, RSS and the ratios against mergekit / copy."""
    copy_t = _median(res.runs, "copy", "copy", "wall_s")
    io_bytes = 4 * res.model_bytes  # 3 models read + 1 written
    head = (
        "| method | tool | wall s (median) | CPU s | GB/s (in+out) | peak RSS MB | peak anon MB "
        "| time / mergekit | time / copy | RSS / mergekit |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for method in [*METHODS, "copy"]:
        mk_t = _median(res.runs, "mergekit", method, "wall_s")
        mk_r = _median(res.runs, "mergekit", method, "maxrss_mb")
        for tool in ("copy",) if method == "copy" else (*OURS, "mergekit"):
            t = _median(res.runs, tool, method, "wall_s")
            if t is None:
                continue
            r = _median(res.runs, tool, method, "maxrss_mb")
            anon = _median(res.runs, tool, method, "peak_anon_mb")
            cpu = _median(res.runs, tool, method, "cpu_s")
            rows.append(
                f"| {method} | {tool} | {t:.2f} | {_fmt(cpu, '.1f')} | "
                f"{io_bytes / GB / t:.2f} | {_fmt(r, '.0f')} | {_fmt(anon, '.0f')} | "
                f"{_fmt(_ratio(t, mk_t), '.2f')} | {_fmt(_ratio(t, copy_t), '.2f')} | "
                f"{_fmt(_ratio(r, mk_r), '.2f')} |"
            )
    return "\n".join(rows)


def repeats_table(res: SizeResult) -> str:
    """Wall time of every repeat, per method and tool, and each of our other tools' paired
    difference to ``mmcompose`` repeat by repeat (the runs are interleaved, so a pair shares
    the machine's state)."""
    rows = ["| method | tool | wall s per repeat | median |", "|---|---|---|---:|"]
    diffs = []
    for method in [*METHODS, "copy"]:
        by_tool: dict[str, dict[int, float]] = {}
        for r in res.runs:
            if r.method == method and not r.returncode:
                by_tool.setdefault(r.tool, {})[r.repeat] = r.wall_s
        for tool, walls in by_tool.items():
            cells = " / ".join(f"{walls[k]:.2f}" for k in sorted(walls))
            rows.append(
                f"| {method} | {tool} | {cells} | {statistics.median(walls.values()):.2f} |"
            )
        ours = by_tool.get("mmcompose", {})
        for tool in OURS[1:]:
            other = by_tool.get(tool, {})
            if common := sorted(set(ours) & set(other)):
                d = " / ".join(f"{ours[k] - other[k]:+.2f}" for k in common)
                diffs.append(f"{method}: mmcompose minus {tool}, repeat by repeat (s): {d}")
    return "\n".join([*rows, "", *diffs]) if diffs else "\n".join(rows)


def sweep_table(results: list[SizeResult]) -> str:
    cols = [(m, t) for m in METHODS for t in (*OURS, "mergekit") if _has(results, t, m)]
    head = "| model GiB | layers | " + " | ".join(f"{m} {t} RSS MB / s" for m, t in cols)
    head += " | copy RSS MB / s |\n|" + "---|" * (len(cols) + 3)
    rows = [head]
    for res in sorted(results, key=lambda r: r.size_gb):
        cells = []
        for m, t in [*cols, ("copy", "copy")]:
            r = _median(res.runs, t, m, "maxrss_mb")
            s = _median(res.runs, t, m, "wall_s")
            cells.append(f"{_fmt(r, '.0f')} / {_fmt(s, '.1f')}")
        rows.append(
            f"| {res.model_bytes / GB:.2f} | {res.shape['layers']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows)


def _has(results: list[SizeResult], tool: str, method: str) -> bool:
    return any(r.tool == tool and r.method == method for res in results for r in res.runs)


def plot(results: list[SizeResult], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r.model_bytes / GB for r in sorted(results, key=lambda r: r.size_gb)]
    pairs = [(m, t) for m in METHODS for t in (*OURS, "mergekit") if _has(results, t, m)]
    for m, t in [*pairs, ("copy", "copy")]:
        rs = sorted(results, key=lambda r: r.size_gb)
        label = "copy" if t == "copy" else f"{t} {m}"
        axes[0].plot(xs, [_median(r.runs, t, m, "maxrss_mb") for r in rs], "o-", label=label)
        axes[1].plot(xs, [_median(r.runs, t, m, "wall_s") for r in rs], "o-", label=label)
    axes[0].set(xlabel="model size (GiB, bf16)", ylabel="peak RSS (MB)")
    axes[1].set(xlabel="model size (GiB, bf16)", ylabel="wall time (s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return f"plot: {path}"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / GB, 1)
    except ImportError:
        pass
    try:
        import importlib.metadata as md

        info["mergekit"] = md.version("mergekit")
        info["safetensors"] = md.version("safetensors")
    except Exception:
        pass
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="size of each model (bf16)")
    p.add_argument("--shape", choices=["scaled", "7b"], default="scaled")
    p.add_argument("--hidden", type=int, default=1024, help="width of the scaled shape")
    p.add_argument("--layers", type=int, help="override the depth (e.g. a reduced 7B)")
    p.add_argument("--repeats", type=int, default=3, help="linear and copy runs per tool")
    p.add_argument("--ties-repeats", type=int, default=1, help="ties is slow (a full sort)")
    p.add_argument("--methods", default="linear,ties")
    p.add_argument("--sweep-methods", default="linear")
    p.add_argument("--sweep", default="0.25,0.5,1,2", help="sizes in GiB; '' for none")
    p.add_argument("--sweep-repeats", type=int, default=1)
    p.add_argument("--tools", default="mmcompose,mergekit,copy")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold")
    p.add_argument("--in-shard-mb", type=int, default=512, help="input shard cap (MiB)")
    p.add_argument("--out-shard-mb", type=int, default=512, help="output shard cap, both tools")
    p.add_argument("--mergekit-args", default="", help="extra mergekit-yaml flags")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="default: a fresh folder under /tmp")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument(
        "--reuse", action="store_true", help="keep the checkpoints and reuse them next time"
    )
    p.add_argument("--before", type=Path, help="src folder run as the mmcompose-before tool")
    p.add_argument("--startup-repeats", type=int, default=3, help="0: skip the import timing")
    p.add_argument("--json", type=Path, default=Path("benchmarks/merge-results.json"))
    p.add_argument("--plot", type=Path, help="PNG of peak RSS and time vs size")
    args = p.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    args.sweep_methods = [m for m in args.sweep_methods.split(",") if m]
    if not set(args.methods + args.sweep_methods) <= set(METHODS):
        p.error(f"methods are {METHODS}")
    bad = set(args.tools) - set(TOOLS)
    if bad:
        p.error(f"unknown tools {sorted(bad)}; choose from {TOOLS}")
    if "mmcompose-before" in args.tools and args.before is None:
        p.error("the mmcompose-before tool needs --before SRC")
    return args


def _sizes(args: argparse.Namespace) -> Iterator[tuple[float, LlamaShape, int]]:
    """(label, shape, repeats per method): the main size, then the other sweep sizes."""
    reps = {m: args.ties_repeats if m == "ties" else args.repeats for m in args.methods}
    sweep = args.sweep_methods
    if args.shape == "7b":
        shape = (
            LLAMA2_7B
            if args.layers is None
            else LlamaShape(**{**asdict(LLAMA2_7B), "layers": args.layers})
        )
        yield round(shape.nbytes() / GB, 2), shape, reps
        return
    yield args.size_gb, shape_for(args.size_gb, args.hidden, args.layers), reps
    for s in (float(x) for x in args.sweep.split(",") if x.strip()):
        if s != args.size_gb:
            yield s, shape_for(s, args.hidden, None), dict.fromkeys(sweep, args.sweep_repeats)


STARTUP = {
    "mmcompose": "from mmcompose.compose import run_from_yaml; import mmcompose.compose.executor",
    "mmcompose-sort": "from mmcompose.compose import run_from_yaml; import mmcompose.compose.executor",
    "mmcompose-before": "from mmcompose.compose import run_from_yaml; import mmcompose.compose.executor",
    "mergekit": "from mergekit.scripts.run_yaml import main",
    "copy": "pass",
}


def startup(
    tools: Sequence[str], env: dict[str, str], before: Path | None = None, repeats: int = 3
) -> dict[str, dict[str, Any]]:
    """Interpreter + import cost of each tool (warm cache, median of ``repeats``): a fixed
    overhead inside every wall time below."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools if repeats else ():
        code = STARTUP[tool]
        if tool == "mmcompose-before":
            code = f"import sys; sys.path.insert(0, {str(before)!r}); {code}"
        runs = [measure([sys.executable, "-c", code], env) for _ in range(repeats)]
        out[tool] = {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "maxrss_mb": statistics.median(r["maxrss_mb"] for r in runs),
        }
        print(f"startup {tool:9s} {out[tool]['wall_s']:.2f} s  {out[tool]['maxrss_mb']:.0f} MB")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_copy"]:  # the copy baseline, in its own process
        copy_baseline([Path(a) for a in argv[3:]], Path(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["--_generate"]:
        shape, role, seed, shard = json.loads(argv[2])
        write_checkpoint(Path(argv[1]), LlamaShape(**shape), role, seed, shard)
        return 0
    if argv[:1] == ["--_compare"]:
        Path(argv[3]).write_text(json.dumps(compare(Path(argv[1]), Path(argv[2]))))
        return 0
    if argv[:1] == ["--from-json"]:  # re-print the tables of a saved run
        saved = json.loads(Path(argv[1]).read_text())
        results = [
            SizeResult(
                **{
                    **r,
                    "runs": [
                        Run(**({"cpu_s": math.nan, "polled_hwm_mb": math.nan} | x))
                        for x in r["runs"]
                    ],
                }
            )
            for r in saved["results"]
        ]
        print(table(results[0]))
        print("\n" + repeats_table(results[0]))
        if len(results) > 1:
            print("\n" + sweep_table(results))
        return 0
    args = parse_args(argv)
    use_cli = bool(set(OURS) & set(args.tools)) and cli_has_compose()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmcompose-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; mmcompose via {'CLI' if use_cli else 'run_from_yaml runner'}")
    results: list[SizeResult] = []
    start = time.perf_counter()
    boot = startup(
        args.tools, os.environ | {"HF_HUB_OFFLINE": "1"}, args.before, args.startup_repeats
    )
    try:
        for label, shape, reps in _sizes(args):
            results.append(bench_size(work, shape, label, reps, args, use_cli))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    main_res = results[0]
    print(f"\n## {main_res.model_bytes / GB:.2f} GiB models, median of {args.repeats}\n")
    print(table(main_res))
    for key, ag in main_res.agreement.items():
        method, _, vs = key.partition("/")
        other = f"mmcompose-{vs}" if vs else "mergekit"
        print(
            f"\n{method}: ours vs {other}, {ag['tensors_compared']} tensors, max abs diff "
            f"{ag['max_abs_diff']} on {ag['worst_tensor']}, {ag['exact_tensors']} bit-identical; "
            f"only ours {ag['only_ours']}, only {other} {ag['only_mergekit']}"
        )
    if len(results) > 1:
        print("\n## Peak RSS (MB) / wall time (s) vs model size\n")
        print(sweep_table(results))
    note = plot(results, args.plot) if args.plot else ""
    if note:
        print(note)
    out = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "mmcompose_entry": "cli" if use_cli else "run_from_yaml",
        "total_s": time.perf_counter() - start,
        "startup": boot,
        "results": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nraw measurements: {args.json}")
    failed = [r for res in results for r in res.runs if r.returncode]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
