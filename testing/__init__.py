"""Test fixtures shipped with the pack: tiny random CogVideoX and Wan models, fake insightface packs, memory
probes (``memory_probe.py``) and the configs and key/shape facts of the real checkpoints (``reference/``), so
tests, benchmarks and ``make demo`` run anywhere without downloading weights. Not used by the nodes or the trainers at run time
(only by the trainers' ``--preset tiny`` demo data)."""

import json
import os

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")


def reference_json(name: str) -> dict:
    """A file of ``reference/``: the CogVideoX-5B configs (``cogvideox/transformer_config_5b.json`` ...), the Wan
    2.1 / 2.2 diffusers configs (``wan/transformer_config_wan2.1_t2v_14b.json``, ``wan/vae_config_wan2.1.json`` ...,
    ``wan/pipeline_facts.json``) and the key/shape manifests of PhotoMaker-V2 and the official DualReal adapter."""
    with open(os.path.join(REFERENCE_DIR, name)) as f:
        return json.load(f)
