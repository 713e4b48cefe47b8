"""Times the scripted bidirectional recurrence against torch.nn (cuDNN on a GPU, the native kernels
on a CPU), forward and forward+backward, with the shapes of ../shared/bench/gpu_rnn_anchor.py
(input 150, hidden 256, 32 steps), and on CUDA also replays the recurrence from a CUDA graph (it
has no host synchronisation, so it can be captured). Checks the outputs agree first.

    python benchmarks/recurrence.py                  # CPU here; on a GPU machine it uses CUDA
    python benchmarks/recurrence.py --json out.json

To compare with the anchor on one card, run both in the same call on the GPU machine:
    python gpu_rnn_anchor.py && python benchmarks/recurrence.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ml.modules.rnn import build_encoder

I, H, T = 150, 256, 32  # noqa: E741 (input, hidden, steps: the shape letters of ml.modules.rnn)


def timed(fn: Callable[..., object], args: tuple, reps: int, device: str) -> float:
    for _ in range(3):
        fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1000


def forward_backward(encoder: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    encoder(x, mask)[0].sum().backward()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--reps", type=int)
    p.add_argument("--json")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = args.batches or ([1, 8, 64, 512] if device == "cuda" else [1, 8, 32])
    reps = args.reps or (50 if device == "cuda" else 5)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "threads": torch.get_num_threads()}
    rows = []
    for cell in ("lstm", "gru"):
        ours = build_encoder("script", cell, I, H, 1, True).to(device)
        ref = build_encoder("native", cell, I, H, 1, True).to(device)
        ref.load_state_dict(ours.state_dict())
        for b in batches:
            x = torch.randn(b, T, I, device=device)
            lengths = torch.randint(T // 2, T + 1, (b,), device=device)
            lengths[0] = T
            mask = torch.arange(T, device=device).unsqueeze(0) < lengths.unsqueeze(1)
            with torch.no_grad():
                err = (ours(x, mask)[0] - ref(x, mask)[0]).abs().max().item()
                ours_fwd = timed(ours, (x, mask), reps, device)
                ref_fwd = timed(ref, (x, mask), reps, device)
            xg = x.clone().requires_grad_(True)
            ours_train = timed(forward_backward, (ours, xg, mask), reps, device)
            ref_train = timed(forward_backward, (ref, xg, mask), reps, device)
            row = {"cell": cell, "batch": b, "max_abs_err": err, "script_fwd_ms": ours_fwd, "torch_fwd_ms": ref_fwd, "script_train_ms": ours_train, "torch_train_ms": ref_train}
            if device == "cuda":
                static_x, static_mask = x.clone(), mask.clone()
                with torch.no_grad():
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for _ in range(3):
                            ours(static_x, static_mask)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_out = ours(static_x, static_mask)[0]
                    graph.replay()
                    torch.cuda.synchronize()
                    row["graph_err"] = (static_out - ref(x, mask)[0]).abs().max().item()
                    row["script_graph_fwd_ms"] = timed(graph.replay, (), reps, device)
            rows.append(row)
    print(f"device: {info['device']}, torch {info['torch']}, {info['threads']} CPU threads; input {I}, hidden {H}, {T} steps, bidirectional")
    print("| cell | batch | max abs err | scripted fwd ms | torch.nn fwd ms | ratio | scripted fwd+bwd ms | torch.nn fwd+bwd ms | ratio |" + (" CUDA graph fwd ms |" if device == "cuda" else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if device == "cuda" else ""))
    for r in rows:
        line = (f"| {r['cell']} | {r['batch']} | {r['max_abs_err']:.1e} | {r['script_fwd_ms']:.2f} | {r['torch_fwd_ms']:.2f} | {r['script_fwd_ms'] / r['torch_fwd_ms']:.2f} | "
                f"{r['script_train_ms']:.2f} | {r['torch_train_ms']:.2f} | {r['script_train_ms'] / r['torch_train_ms']:.2f} |")
        if device == "cuda":
            line += f" {r['script_graph_fwd_ms']:.2f} |"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
