"""Convert a reward checkpoint published as a pickle (.pt / .pth) once into a safetensors folder for load_reward.

    python scripts/convert_reward_checkpoint.py --kind hpsv2.1      # downloads xswu/HPSv2 HPS_v2.1_compressed.pt
    python scripts/convert_reward_checkpoint.py --kind imagereward  # downloads THUDM/ImageReward ImageReward.pt
    python scripts/convert_reward_checkpoint.py --kind aesthetic --checkpoint sac+logos+ava1-l14-linearMSE.pth

The checkpoint is read with torch.load(weights_only=True) (tensors only, never code). The folder goes to --out,
by default $DIFFALIGN_REWARDS_DIR/KIND (~/.cache/diffalign/rewards/KIND), where load_reward(KIND) looks for it;
reward_source.json in it records the source (hub id @ commit / file, or local path) and the checkpoint's sha256.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffalign.evaluation.rewards.base import converted_dir
from diffalign.evaluation.rewards.convert import (
    aesthetic_files,
    hps_files,
    imagereward_files,
    load_pickled_state_dict,
    sha256_of,
    write_folder,
)
from diffalign.options import option, parse_args, validate_choices

PUBLISHED = {  # kind -> (hub repo, checkpoint file); the aesthetic MLP is published on GitHub only
    "hpsv2.1": ("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    "imagereward": ("THUDM/ImageReward", "ImageReward.pt"),
}
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE.pth)"


@dataclass
class ConvertConfig:
    kind: Literal["hpsv2.1", "imagereward", "aesthetic"] = option("hpsv2.1", "which reward the checkpoint holds")
    checkpoint: str | None = option(
        None, "the pickled checkpoint (.pt/.pth); default: download the published one (hpsv2.1, imagereward)"
    )
    revision: str | None = option(None, "hub revision of the published files (default main; the commit is recorded)")
    med_config: str | None = option(None, "imagereward: its med_config.json (default: from THUDM/ImageReward)")
    tokenizer: str = option("google-bert/bert-base-uncased", "imagereward: the BERT tokenizer (folder or hub id)")
    out: str | None = option(None, "output folder (default: $DIFFALIGN_REWARDS_DIR/KIND, where load_reward looks)")

    def __post_init__(self):
        validate_choices(self)


def fetch(repo: str, filename: str, revision: str | None) -> tuple[Path, str]:
    """A published file from the hub -> (local path, "repo@commit/filename")."""
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(repo, filename, revision=revision))
    return path, f"{repo}@{path.parent.name}/{filename}"


def bert_tokenizer_saver(name: str, vocab_size: int):
    """Save BLIP's tokenizer (BERT + ``[DEC]`` bos + ``[ENC]``, as BLIP ``init_tokenizer``) into the folder."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(name)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer {name} has {len(tokenizer)} tokens with [DEC]/[ENC], the model {vocab_size}.")
    return tokenizer.save_pretrained


def main(argv: list[str] | None = None) -> int:
    config = parse_args(ConvertConfig, argv, prog="convert_reward_checkpoint.py")
    if config.checkpoint is not None:
        checkpoint, source = Path(config.checkpoint).expanduser(), str(Path(config.checkpoint).expanduser().resolve())
    elif config.kind in PUBLISHED:
        checkpoint, source = fetch(*PUBLISHED[config.kind], config.revision)
    else:
        raise SystemExit(f"--kind aesthetic needs --checkpoint FILE: download it from {AESTHETIC_URL}.")
    state = load_pickled_state_dict(checkpoint)
    record = {"kind": config.kind, "source": source, "sha256": sha256_of(checkpoint)}
    extra = None
    if config.kind == "hpsv2.1":
        tensors, jsons = hps_files(state)
    elif config.kind == "aesthetic":
        tensors, jsons = aesthetic_files(state)
    else:
        if config.med_config is None:
            med_path, record["med_config"] = fetch(PUBLISHED["imagereward"][0], "med_config.json", config.revision)
        else:
            med_path = record["med_config"] = config.med_config
        tensors, jsons, dropped = imagereward_files(state, json.loads(Path(med_path).read_text()))
        record["tokenizer"], record["dropped_keys"] = config.tokenizer, dropped
        extra = bert_tokenizer_saver(config.tokenizer, jsons["config.json"]["text_config"]["vocab_size"])
    out = write_folder(config.out or converted_dir(config.kind), tensors, jsons, record, extra)
    count = sum(len(state) for state in tensors.values())
    print(f"wrote {out} ({count} tensors from {source}); load it with load_reward('{config.kind}:{out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
