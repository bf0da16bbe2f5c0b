"""Which onnxruntime int8 settings pass the quality gate on every x86-64 CPU class.

    python benchmarks/int8_settings.py --model world-tiny --seed 0 --check-count 32

For each int8 mode (dynamic, static) and each setting, the fp32 export is quantised and gated
against PyTorch fp32 on this CPU (VNNI/AMX: exact int32 sums) and, for dynamic graphs, under an
emulation of the pre-VNNI (AVX2) u8s8 kernel whose int16 pair sums saturate. The worst pair sum
says whether saturation is possible at all (≤ 32767: impossible).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from export.checks import check_pairs, compare
from export.int8_portability import PreVnniEmulatedBackend, worst_pair_sum
from export.pipeline import calibration_feeds, run_export
from export.precision import ENCODERS, Int8Settings, to_int8
from ttd.model.factory import create_model, load_model
from ttd.runtime.hardware import cpu_capabilities
from ttd.runtime.images import Preprocess
from ttd.runtime import model_tagger
from ttd.runtime.export_dir import read_export
from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend
from ttd.runtime.torch_backend import TorchBackend

SETTINGS = {
    "full range (onnxruntime default)": Int8Settings(reduce_range=False, per_channel=False),
    "full range, per channel": Int8Settings(reduce_range=False, per_channel=True),
    "reduce range": Int8Settings(reduce_range=True, per_channel=False),
    "reduce range, per channel (PORTABLE)": Int8Settings(),
    "reduce range, per channel, s8 activations": Int8Settings(unsigned_activations=False),
    "u8 weights (u8u8), full range, per channel": Int8Settings(reduce_range=False, per_channel=True, unsigned_weights=True),
    "u8 weights (u8u8), full range (PORTABLE_STATIC)": Int8Settings(reduce_range=False, per_channel=False,
                                                                   unsigned_weights=True),
}


def summary(figures: dict) -> dict:
    return {"image_cos": figures["min_cosine"]["image_embeds"], "patch_cos": figures["min_cosine"]["patch_embeds"],
            "text_cos": figures["min_cosine"]["text_embeds"], "tag_agreement": figures["tag_agreement"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=None, help="random-initialise the architecture with this seed")
    parser.add_argument("--check-count", type=int, default=32)
    parser.add_argument("--no-emulation", action="store_true", help="skip the (slow) pre-VNNI emulation")
    parser.add_argument("--modes", default="dynamic,static", help="int8 modes to measure, comma separated")
    parser.add_argument("--only", default="", help="measure only the settings whose label contains this text")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    make = (lambda: create_model(args.model, seed=args.seed)) if args.seed is not None else (lambda: load_model(args.model))
    model = make()
    reference = model_tagger(TorchBackend(model, "cpu", "float32"), model)
    images, captions = check_pairs(Preprocess.for_model(model.config), args.check_count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "fp32"
        run_export(make(), base, check_count=4)
        for mode in args.modes.split(","):
            calibration = calibration_feeds(model, images, captions) if mode == "static" else {}
            for label, settings in SETTINGS.items():
                if args.only not in label or mode == "dynamic" and not settings.unsigned_activations:
                    continue  # dynamic quantisation always makes u8 activations
                work = Path(tmp) / "variant"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(base, work)
                for name in ENCODERS:
                    to_int8(work / f"{name}.onnx", mode, calibration.get(name), settings)
                export = read_export(work, verify=False)
                row = {"mode": mode, "settings": label, "worst_pair_sum": max(worst_pair_sum(export.graph(n)) for n in ENCODERS),
                       "native": summary(compare(reference, model_tagger(OnnxRuntimeBackend(export, "cpu"), model), images, captions))}
                if mode == "dynamic" and not args.no_emulation:
                    row["pre_vnni_emulated"] = summary(compare(reference, model_tagger(PreVnniEmulatedBackend(export), model),
                                                               images, captions))
                rows.append(row)
                print(json.dumps(row), flush=True)
    caps = cpu_capabilities()
    print(f"\nCPU: {caps.model} ({caps.isa_class}); model {model.config.name}, seed {args.seed}, {args.check_count} pairs")
    print("| mode | settings | worst pair sum | native: image / patch / text cos, tags | pre-VNNI emulated |")
    print("|---|---|---|---|---|")
    for row in rows:
        def fmt(f):
            return f"{f['image_cos']:.4f} / {f['patch_cos']:.4f} / {f['text_cos']:.4f}, {100 * f['tag_agreement']:.1f}%"
        emulated = fmt(row["pre_vnni_emulated"]) if "pre_vnni_emulated" in row else "—"
        print(f"| {row['mode']} | {row['settings']} | {row['worst_pair_sum']} | {fmt(row['native'])} | {emulated} |")
    if args.out:
        args.out.write_text(json.dumps({"cpu": caps.to_dict(), "model": model.config.name, "seed": args.seed, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
