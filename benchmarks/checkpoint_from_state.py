"""A TTD checkpoint (model.safetensors, LoRA merged) from a training state `last.pt` of a run that
was stopped before its end: the weights as they were at that step, for measuring a partly
trained model (the issue-13 segmentation table used the step-100 state of a 300-step run, stopped
for time on a shared 2-core machine).

    python benchmarks/checkpoint_from_state.py runs/ttd/last.pt runs/ttd-step100/model.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ttd.model.factory import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
from ttd.model.lora import LoRAConfig, inject_lora, merged_state_dict
from ttd.train.loop import _load_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", type=Path, default=DEFAULT_CHECKPOINT)
    args = parser.parse_args()
    state = _load_state(args.state)
    config = json.loads(state["config"])
    if config["objective"] != "ttd":
        raise SystemExit(f"{args.state}: objective {config['objective']!r}; this helper handles TTD runs")
    model = load_checkpoint(args.base)
    inject_lora(model, LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["lora"].items()}))
    model.load_state_dict(state["model"])
    model.eval()
    model.config.source = f"ttd-step{state['step']}:{model.config.source}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out, merged_state_dict(model))
    print(f"wrote {args.out} (step {state['step']} of {config['steps']})")


if __name__ == "__main__":
    main()
