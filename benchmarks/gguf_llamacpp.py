"""llama.cpp runs lowbit's GGUF export: next-token argmax against lowbit's float reference.

    python benchmarks/gguf_llamacpp.py                    # train a small ternary LLaMA, compare
    python benchmarks/gguf_llamacpp.py --run RUN          # a finished LLaMA run instead
    python benchmarks/gguf_llamacpp.py --run RUN --fallback f16 --float-activations

Needs ``llama-cpp-python`` (``pip install llama-cpp-python`` compiles llama.cpp from source,
several CPU-minutes); without it the script says so and exits 0 before doing anything else.

Without ``--run`` it trains a BitNet b1.58 LLaMA whose rows are multiples of 256 (dim 256, 2
layers, 4 heads, 2 KV heads, SwiGLU width 512; ternary absmean weights, 8-bit per-token absmax
activations without the in-layer norm, float embedding and head) for ``--steps`` AdamW steps on
the ``pydoc`` training split. It writes the model as GGUF (TQ2_0 by default), loads it with
llama.cpp and, on the first ``--windows`` test windows of ``--seq-len`` bytes, compares
llama.cpp's next-token argmax with

* lowbit's float reference: the exported weights (dequantised ternary codes) with float
  activations, what the GGUF file describes (goal: equal on >= 99% of positions), and
* the fake-quantised model as trained (int8 per-token activations), for information.

Exit status 1 when the agreement with the float reference is below ``--goal``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lowbit
from lowbit.data import load_dataset
from lowbit.export.gguf_model import export_gguf
from lowbit.models.llama import llama
from lowbit.train.lm import lm_loss

RECIPE = {
    "weights": {"method": "bitnet"},
    "activations": {"method": "bitnet", "bits": 8, "norm": False},
    "last_layer": "float",
}


def train_small(steps: int, seq_len: int, seed: int) -> nn.Module:
    """A ternary LLaMA with 256-multiple rows, trained briefly on pydoc's training split."""
    torch.manual_seed(seed)
    model = llama(256, (seq_len,), dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden=512)
    model.init_weights(torch.Generator().manual_seed(seed))
    lowbit.quantize(model, RECIPE)
    train = load_dataset("pydoc", seq_len=seq_len, seed=seed).train
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    step = 0
    while step < steps:
        for x, y in loader:
            loss = lm_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"step {step}/{steps}: loss {loss.item():.3f}")
            if step == steps:
                break
    return model.eval()


def float_reference(model: nn.Module) -> nn.Module:
    """The exported weights with float activations (input quantisers removed)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if getattr(m, "input_quant", None) is not None:
            m.input_quant = None
    return ref.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a finished LLaMA run (default: train one)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64, help="test windows compared")
    ap.add_argument("--ternary-type", choices=("tq2_0", "tq1_0"), default="tq2_0")
    ap.add_argument("--fallback", choices=("f16", "f32"))
    ap.add_argument("--float-activations", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--goal", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print(
            "llama-cpp-python is not installed: skipping the llama.cpp check (pip install "
            "llama-cpp-python builds llama.cpp from source). The offline checks of the GGUF "
            "file are tests/test_gguf.py."
        )
        return 0

    if args.run is not None:
        from lowbit.train.experiment import load_run

        model = load_run(args.run)[1]
    else:
        model = train_small(args.steps, args.seq_len, args.seed)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    test = load_dataset("pydoc", seq_len=seq_len, seed=args.seed).test
    ref = float_reference(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(
            model,
            Path(tmp) / "model.gguf",
            ternary_type=args.ternary_type,
            fallback=args.fallback,
            float_activations=args.float_activations,
        )
        print(f"wrote {path.stat().st_size:,} bytes of GGUF ({args.ternary_type})")
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=seq_len,
            n_batch=seq_len,
            logits_all=True,
            n_threads=args.threads,
            verbose=False,
        )
        agree_ref = agree_fq = total = 0
        worst = 0.0
        for i in range(min(args.windows, len(test))):
            x, _ = test[i]
            ids = x.tolist()
            llm.reset()
            llm.eval(ids)
            theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
            with torch.no_grad():
                ours = ref(x[None])[0].double().numpy()
                fake = model(x[None])[0].double().numpy()
            agree_ref += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
            agree_fq += int((theirs.argmax(-1) == fake.argmax(-1)).sum())
            worst = max(worst, float(np.abs(theirs - ours).max()))
            total += len(ids)
    share = agree_ref / total
    print(f"positions: {total} ({min(args.windows, len(test))} test windows of {seq_len})")
    print(f"argmax equal to lowbit's float reference: {share:.2%} (goal >= {args.goal:.0%})")
    print(f"argmax equal to the fake-quantised model:  {agree_fq / total:.2%}")
    print(f"largest |logit difference| vs the float reference: {worst:.4f}")
    return 0 if share >= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
