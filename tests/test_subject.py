"""Subject reference: token stream vs the base model, scoped norm LoRA, replay trainer."""

import dataclasses
import math
import os
import shutil

import pytest
import torch
from conftest import bundle_from_components

from magicmirror_video.models.lora import TrainableLora, find_lora_targets, load_lora_file
from magicmirror_video.models.patches import applied_patches
from magicmirror_video.models.sampler import rotary_embeddings, sample_video
from magicmirror_video.models.subject import (
    BRANCH_ATTR,
    LORA_TARGETS,
    NORM_LORA_MODULES,
    SubjectReferencePatch,
    encode_reference,
    inject_reference,
)
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.testing import tiny
from magicmirror_video.training.config import load_config
from magicmirror_video.training.train_subject_replay import (
    PRESETS,
    SubjectReplayTrainConfig,
    SubjectReplayTrainer,
    random_frame_index,
)

KW = dict(num_frames=9, height=32, width=48, steps=2, cfg=6.0, seed=0)


def forward(t, hidden, text, rope):
    with torch.no_grad():
        return t(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([400]),
                 image_rotary_emb=rope, return_dict=False)[0]


def test_reference_stream_equals_base_model_with_reference_as_frame_zero():
    """[text; ref; video] with ref at frame 0 == the unmodified diffusers model on [ref frame; video]."""
    t = tiny.build_components(num_layers=3)["transformer"]
    g = torch.Generator().manual_seed(0)
    video, ref = torch.randn(1, 3, 4, 4, 6, generator=g), torch.randn(1, 4, 4, 6, generator=g)
    text = torch.randn(1, 12, 32, generator=g)
    base = forward(t, torch.cat([ref[:, None], video], 1), text, rotary_embeddings(t, 32, 48, 4, 8, "cpu"))
    undo = inject_reference(t, ref)
    try:
        ours = forward(t, video, text, rotary_embeddings(t, 32, 48, 3, 8, "cpu"))
    finally:
        undo()
    assert ours.shape == video.shape  # the reference is dropped before the output layers
    torch.testing.assert_close(ours, base[:, 1:], atol=1e-5, rtol=1e-5)


def test_zero_lora_and_no_reference_equal_base_and_reference_changes_output():
    b = bundle_from_components(tiny.build_components())
    pos = encode_prompt(b, "a teddy bear is sitting on a wooden table")
    base = sample_video(b, pos, **KW)
    lora = TrainableLora(b.transformer, find_lora_targets(b.transformer, list(LORA_TARGETS)), 4, 4.0,
                         reference_only=NORM_LORA_MODULES)
    with_lora = sample_video(b.with_patch(lora), pos, **KW)
    assert torch.equal(with_lora, base)
    ref = encode_reference(b, torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(1)))
    assert ref.shape == (2, 4, 4, 6)  # any size: 40x56 -> 32x48 -> 4x6 latents, two references
    out = sample_video(b.with_patch(SubjectReferencePatch(ref)), pos, **KW)
    assert out.shape == base.shape and (out - base).abs().max() > 1e-3
    assert torch.equal(sample_video(b, pos, **KW), base)


def test_norm_lora_touches_only_the_reference_modulation():
    t = tiny.build_components()["transformer"]
    lora = TrainableLora(t, find_lora_targets(t, list(NORM_LORA_MODULES)), 4, 4.0, reference_only=NORM_LORA_MODULES)
    with torch.no_grad():
        for p in lora.up.values():
            p.normal_(0, 1.0)
    records = {}

    def record(tag):
        def hook(mod, args, out):
            records.setdefault(tag, []).append((getattr(mod, BRANCH_ATTR, None), out.detach().clone()))
        return hook

    g = torch.Generator().manual_seed(0)
    video, ref, text = torch.randn(1, 3, 4, 4, 6, generator=g), torch.randn(1, 4, 4, 6, generator=g), torch.randn(1, 9, 32)
    rope = rotary_embeddings(t, 32, 48, 3, 8, "cpu")
    for tag, patches in (("base", []), ("lora", [lora])):
        undo = inject_reference(t, ref)
        try:
            with applied_patches(t, patches):  # the recorder runs after the LoRA hook
                handle = t.transformer_blocks[0].norm1.linear.register_forward_hook(record(tag))
                forward(t, video, text, rope)
                handle.remove()
        finally:
            undo()
    (b_base, b_ref), (l_base, l_ref) = records["base"], records["lora"]
    assert b_base[0] is None and b_ref[0] == "reference"
    assert torch.equal(l_base[1], b_base[1])  # text/video modulation untouched by the norm LoRA
    assert not torch.allclose(l_ref[1], b_ref[1])  # the reference's modulation changes
    with applied_patches(t, [lora]):  # and without a reference the norm LoRA changes nothing at all
        assert torch.equal(forward(t, video, text, rope), forward(t, video, text, rope))
    plain = forward(t, video, text, rope)
    with applied_patches(t, [lora]):
        assert torch.equal(forward(t, video, text, rope), plain)


def test_task_switching_ratio_and_frame_selection():
    config = load_config(SubjectReplayTrainConfig, ["--replay_prob", "0.2"])
    trainer = SubjectReplayTrainer(config)
    n, p = 2000, 0.2
    videos = sum(trainer.task_of(s) == "video" for s in range(n))
    assert abs(videos - n * p) <= 3 * math.sqrt(n * p * (1 - p)), videos
    g = torch.Generator().manual_seed(0)
    picks = [random_frame_index(13, g) for _ in range(2000)]
    assert set(picks) == set(range(1, 14))


@pytest.fixture(scope="module")
def tiny_subject(tmp_path_factory):
    from magicmirror_video.training.presets import build_tiny_subject
    out = tmp_path_factory.mktemp("subject")
    return build_tiny_subject(load_config(SubjectReplayTrainConfig, ["--preset", "tiny", "--output_dir", str(out)],
                                          PRESETS))


def test_conflict_monitor_equals_direct_gradient_cosine(tiny_subject, tmp_path):
    from accelerate import Accelerator
    trainer = SubjectReplayTrainer(dataclasses.replace(tiny_subject, output_dir=str(tmp_path)))
    trainer.accelerator = Accelerator(cpu=True)
    trainer.module = module = trainer.build()
    with torch.no_grad():
        for p in module.lora.up.values():
            p.normal_(0, 0.1)
    data = trainer.dataset()
    img, vid = trainer.collate([data["image"][0]], "image"), trainer.collate([data["video"][0]], "video")
    monitored = trainer.gradient_cosine(img, vid)
    module.eval()  # the monitor measures without LoRA dropout
    grads = []
    for batch in (img, vid):  # direct: backward into .grad
        module.zero_grad()
        module(batch, torch.Generator().manual_seed(0))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.lora.parameters() if p.requires_grad]))
    direct = (grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm())).item()
    assert monitored == pytest.approx(direct, abs=1e-6)
    assert -1 <= monitored <= 1


def test_conflict_monitor_on_training_gradients(tiny_subject, tmp_path, monkeypatch):
    """The paper's form: at each logged step, the cosine of the latest image step's and the latest video step's
    training gradients (recorded here independently from the parameters' .grad before each optimizer step)."""
    import json

    recorded = []
    original = SubjectReplayTrainer.before_optimizer_step

    def record(self, step):
        grads = [p.grad.flatten() for p in self.accelerator.unwrap_model(self.module).lora.parameters()
                 if p.requires_grad and p.grad is not None]
        recorded.append((step, self.task_of(step), torch.cat(grads).clone()))
        return original(self, step)

    monkeypatch.setattr(SubjectReplayTrainer, "before_optimizer_step", record)
    config = dataclasses.replace(tiny_subject, output_dir=str(tmp_path), max_steps=8, checkpointing_steps=0,
                                 conflict_steps=1, conflict_monitor="training")
    SubjectReplayTrainer(config).train()
    logged = json.load(open(tmp_path / "grad_conflict.json"))
    assert logged, "no conflict logged"
    for entry in logged:
        latest = {}
        for step, task, grad in recorded:
            if step < entry["step"]:
                latest[task] = grad
        expected = torch.nn.functional.cosine_similarity(latest["image"].double(), latest["video"].double(), dim=0)
        assert entry["cosine"] == pytest.approx(expected.item(), abs=1e-6)
    tasks = [task for _, task, _ in recorded]
    first_both = max(tasks.index("image"), tasks.index("video")) + 1
    assert logged[0]["step"] == first_both  # nothing is logged before both tasks have had a step


def test_training_resumes_exactly_and_exports_a_lora_the_node_loads(tiny_subject, tmp_path, monkeypatch):
    from conftest import assert_same_weights, straight_and_resumed
    a, b, straight = straight_and_resumed(SubjectReplayTrainer, tiny_subject, tmp_path, 4, max_steps=8,
                                          checkpointing_steps=4, lr_scheduler="cosine_with_restarts", lr_num_cycles=2,
                                          conflict_steps=4)
    assert (tmp_path / "straight" / "grad_conflict.png").is_file()
    assert_same_weights(a, b)
    assert load_lora_file(straight).metadata["subject_lora_scope"] == "reference"

    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    shutil.copy(straight, models / "loras" / "subject.safetensors")
    os.symlink(os.path.dirname(tiny_subject.model_path), models / "CogVideo")
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(models))
    from magicmirror_video import nodes
    m = nodes.NODE_CLASS_MAPPINGS
    (model,) = m["MMV_CogVideoXModelLoader"]().load("tiny-t2v", "fp32", "none")
    (lora_model,) = m["MMV_SubjectReferenceLoraLoader"]().load(model, "subject.safetensors", 1.0, "auto")
    assert lora_model.patches[-1].reference_only == NORM_LORA_MODULES
    (with_ref,) = m["MMV_SubjectReference"]().apply(lora_model, torch.rand(1, 48, 48, 3), 720)
    (plain_ref,) = m["MMV_SubjectReference"]().apply(model, torch.rand(1, 48, 48, 3), 720)
    enc = m["MMV_CogVideoXTextEncode"]()
    (pos,), (neg,) = enc.encode(model, "<cls> a teddy bear is sitting on a table"), enc.encode(model, "")
    from magicmirror_video.models.text import with_extra_tokens
    cls_id = with_extra_tokens(model.tokenizer).convert_tokens_to_ids("<cls>")
    assert pos.input_ids[0, 0] == cls_id  # the trainer's tokenizer and the node's agree on <cls>
    assert "<cls>" not in model.tokenizer.get_vocab()  # the shared tokenizer is not edited
    kw = dict(width=32, height=32, num_frames=9, steps=2, cfg=6.0, seed=0, scheduler="DDIM")
    a = m["MMV_CogVideoXSampler"]().sample(with_ref, pos, neg, **kw)[0]["samples"]
    b = m["MMV_CogVideoXSampler"]().sample(plain_ref, pos, neg, **kw)[0]["samples"]
    assert (a - b).abs().max() > 1e-5


def test_cls_prompts_leave_the_shared_text_encoder_unchanged():
    """<cls> is handled per encode: the model's tokenizer and T5 are not edited, so base prompt encodings
    before and after a subject run are bit-identical; <cls> gets the table's mean row (a tiny T5 has no
    spare rows), the same in every encode."""
    from magicmirror_video.models.text import encode_prompt, t5_encode, tokenize, with_extra_tokens

    b = bundle_from_components(tiny.build_components())
    te = b.text_encoder
    before = {k: v.clone() for k, v in te.state_dict().items()}
    vocab = len(b.tokenizer)
    base = encode_prompt(b, "a teddy bear is sitting on a wooden table").embeds
    ref = encode_reference(b, torch.rand(1, 32, 32, 3))
    with_cls = encode_prompt(b, "<cls> a teddy bear is sitting on a wooden table")
    sample_video(b.with_patch(SubjectReferencePatch(ref)), with_cls, **KW)
    b.text_cache._items.clear()
    after = encode_prompt(b, "a teddy bear is sitting on a wooden table").embeds
    assert torch.equal(base, after) and len(b.tokenizer) == vocab and "<cls>" not in b.tokenizer.get_vocab()
    assert all(torch.equal(before[k], v) for k, v in te.state_dict().items())
    # <cls> embeds as the mean row: the same as T5 on a table resized with that row
    ids = tokenize(with_extra_tokens(b.tokenizer), "<cls> a teddy bear").input_ids
    import copy
    resized = copy.deepcopy(te)
    mean = te.get_input_embeddings().weight.mean(0)
    resized.resize_token_embeddings(vocab + 1, mean_resizing=False)
    with torch.no_grad():
        resized.get_input_embeddings().weight[vocab] = mean
        torch.testing.assert_close(t5_encode(te, ids), resized(ids)[0], atol=0, rtol=0)


def test_files_without_scope_metadata_default_to_all_tokens():
    from magicmirror_video.nodes.subject import lora_scope
    assert lora_scope({}, "auto") == "all"  # e.g. the released v1 checkpoint (its toggle was a no-op)
    assert lora_scope({"subject_lora_scope": "reference"}, "auto") == "reference"
    assert lora_scope({"subject_lora_scope": "reference"}, "all") == "all"


def test_each_task_has_its_own_batch_size_and_walks_its_own_stream():
    """Pair steps draw pair_batch_size samples, video steps video_batch_size; over all ranks and micro-steps,
    each task's draws, in stream order, visit every sample once per epoch."""
    from types import SimpleNamespace
    config = load_config(SubjectReplayTrainConfig, ["--replay_prob", "0.3", "--pair_batch_size", "3",
                                                    "--video_batch_size", "2", "--gradient_accumulation_steps", "2"])
    data = {"image": list(range(7)), "video": list(range(5))}
    sizes, draws = {"image": 3, "video": 2}, {"image": [], "video": []}
    for rank in (0, 1):
        trainer = SubjectReplayTrainer(config)
        trainer.accelerator = SimpleNamespace(num_processes=2, process_index=rank)
        trainer.collate = lambda items, kind: (kind, items)
        for step in range(60):
            for micro in range(2):
                kind, items = trainer.next_batch(data, step, micro)
                assert kind == trainer.task_of(step) and len(items) == sizes[kind]
                draws[kind].append(((step, micro, rank), items))
    for kind, n in (("image", 7), ("video", 5)):
        stream = [i for _, items in sorted(draws[kind]) for i in items]
        epochs = len(stream) // n
        assert epochs >= 4 and all(sorted(stream[e * n:(e + 1) * n]) == list(range(n)) for e in range(epochs)), kind
    assert trainer.effective_batch() == "pair_batch_size 12, video_batch_size 8"


def test_v1_lora_without_metadata_loads_like_peft_at_default_settings(tmp_path, monkeypatch):
    """The released v1 checkpoint (diffusers keys, r=128, no adapter metadata) was trained and run by PEFT
    with lora_alpha 64: the Subject Reference LoRA Loader at its defaults must give PEFT's model."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from magicmirror_video.models.lora import parse_lora_state_dict, save_lora
    from magicmirror_video.models.patches import applied_patches
    from magicmirror_video.nodes.subject import SubjectReferenceLoraLoader

    targets = ["to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "norm2.linear", "ff.net.2", "proj", "text_proj"]
    peft_model = tiny.build_components()["transformer"]
    peft_model.add_adapter(LoraConfig(r=128, lora_alpha=64, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert len(state) > 2 * 10 and all(v.shape[0] == 128 or v.shape[1] == 128 for v in state.values())
    (tmp_path / "loras").mkdir()
    save_file(state, str(tmp_path / "loras" / "v1.safetensors"))  # no metadata, as the released file
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(tmp_path))

    g = torch.Generator().manual_seed(1)
    video, text = torch.randn(1, 3, 4, 4, 6, generator=g), torch.randn(1, 9, 32, generator=g)
    base = bundle_from_components(tiny.build_components())
    rope = rotary_embeddings(base.transformer, 32, 48, 3, 8, "cpu")
    expected = forward(peft_model, video, text, rope)
    outputs = {}
    for alpha in (None, 128.0):  # the node's default, then an explicit alpha = rank (diffusers' scale 1)
        kwargs = {} if alpha is None else {"alpha": alpha}
        (patched,) = SubjectReferenceLoraLoader().load(base, "v1.safetensors", 1.0, "auto", **kwargs)
        assert patched.patches[-1].reference_only == ()  # no scope metadata: the norm LoRA on every token
        with applied_patches(base.transformer, patched.patches):
            outputs[alpha] = forward(base.transformer, video, text, rope)
    torch.testing.assert_close(outputs[None], expected, atol=1e-5, rtol=0)
    assert (outputs[128.0] - expected).abs().max() > 1e-3  # scale 1 is not the authors' model
    assert (expected - forward(base.transformer, video, text, rope)).abs().max() > 1e-3  # the LoRA does something
    # Files that record their scale ignore alpha: PEFT metadata, and the pack's exports (scale baked in).
    layers = parse_lora_state_dict(state, {"lora_adapter_metadata": '{"r": 128, "lora_alpha": 32}'}, alpha=64).layers
    assert {layer.scale for layer in layers.values()} == {0.25}
    save_lora(str(tmp_path / "pack.safetensors"), {"to_q": next(iter(layers.values()))}, {"method": "subject_replay"})
    assert load_lora_file(str(tmp_path / "pack.safetensors"), alpha=64).layers["to_q"].scale == 1.0
