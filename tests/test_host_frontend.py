"""Host tests: the shipped workflows in ComfyUI's own frontend, driven in headless Chromium.

ComfyUI serves the frontend its requirements install (``comfyui-frontend-package``); playwright's Python client
drives a system Chromium through ``executable_path`` (Debian: ``apt-get install -y chromium``; no browser
download). One ComfyUI (loopback, temporary base directory, tests/comfy_host.py) and one browser page serve the
tests here (the page-load check opens a second page for its comparison):

* the page loads the pack's node definitions without a console error or page error that the same page without
  them (``/api/object_info`` answered with the custom nodes removed) does not show;
* ``/api/workflow_templates`` lists every shipped workflow under the pack's folder (*Browse Templates*);
* every shipped workflow, fetched from there and opened as the templates dialog opens it (``app.loadGraphData``),
  has every node type registered (no missing-node dialog), keeps every widget value of the file, each combo value
  one of the widget's options (the files the workflow names exist in the test's models folder) and each number
  within the widget's min..max, logs no console error or warning, converts with the frontend's own
  ``app.graphToPrompt()`` to exactly what ``comfy_host.ui_to_api`` (the other host tests' conversion) makes, shows
  no two nodes overlapping (bounding boxes with title bar and source badge, as the frontend measures them), and is
  photographed (and its templates-dialog thumbnail made);
* the templates dialog shows the pack's cards with their thumbnails (``workflows/<name>.jpg``) and no console error;
* the combined workflow (MagicMirror + Reg-DPO LoRA + DualReal) is pointed at the tiny models through its widgets,
  queued with the Run button, and its video decoded (9 frames of 32x32); the prompt the frontend sent equals
  ``ui_to_api`` of the workflow it sent; the blend plot shows in the Preview Image node (photographed);
* Identity Score on a synthetic clip loaded by core's Load Video (the reference face, then another face, then
  none) reports the frames with a face; its plot is the README's identity curve.

The tiny models are the ones tests/test_host_workflows.py builds (random weights: the videos are noise, the
pictures show the interface). Files the shipped workflows name but the tests do not need (CogVideoX-5b, Wan 2.1,
T5-XXL) are empty placeholders, so the combos list them.

Pictures (PNG, palette-compressed) go to ``$MMV_PICTURES`` when set (``make pictures`` sets docs/pictures, what the
README shows), thumbnails (JPEG) to ``$MMV_THUMBNAILS`` (``make pictures``: workflows), else both to pytest's temporary
folder. Skipped without ``COMFYUI_PATH``, playwright or Chromium.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

PACK_DIR = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
COMBINED = "identity_motion_preference"
IDENTITY_CLIP = "identity_clip.mp4"
VIEWPORT = {"width": 1920, "height": 1080}
WIDTH = HEIGHT = 32
FRAMES, STEPS = 9, 12  # 12 steps: a readable blend plot (one column per step)
PICTURE_LIMIT = 300_000  # bytes per PNG
THUMBNAIL_SIDE = 384  # px, square: the templates dialog's cards crop to a square

# Frontend settings of the test user: no first-run template dialog, no minimap over the graph, no FPS overlay.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}

# Combo inputs naming files: where a placeholder makes the shipped value a listed option.
# (class_type, input) -> (models subfolder, "file" | "folder" (CogVideoX, with transformer/) | "pack" (insightface)).
MODEL_COMBOS = {
    ("MMV_CogVideoXModelLoader", "model"): ("CogVideo", "folder"),
    ("MMV_CogVideoXLoraLoader", "lora_name"): ("loras", "file"),
    ("MMV_SubjectReferenceLoraLoader", "lora_name"): ("loras", "file"),
    ("MMV_MagicMirrorApply", "adapter"): ("magicmirror", "file"),
    ("MMV_MagicMirrorFaceEncoderLoader", "insightface"): ("insightface", "pack"),
    ("MMV_MagicMirrorFaceEncoderLoader", "photomaker"): ("photomaker", "file"),
    ("MMV_DualRealStageBlender", "adapter"): ("dualreal", "file"),
    ("MMV_DualRealStageBlender", "clip_vision"): ("clip_vision", "file"),
    ("CLIPLoader", "clip_name"): ("text_encoders", "file"),
    ("UNETLoader", "unet_name"): ("diffusion_models", "file"),
    ("LoraLoaderModelOnly", "lora_name"): ("loras", "file"),
    ("VAELoader", "vae_name"): ("vae", "file"),
    ("CLIPVisionLoader", "clip_name"): ("clip_vision", "file"),
}

# What the page reports about the loaded graph (run in the browser).
GRAPH_STATE_JS = """() => {
  const nodes = app.graph.nodes.map((n) => {
    const r = n.boundingRect;
    const badges = (n.badges || []).map((b) => (typeof b === 'function' ? b() : b));
    const badgeHeight = badges.length ? Math.max(...badges.map((b) => b.height || 0)) + 2 : 0;  // drawn above
    const widgets = (n.widgets || []).map((w) => ({
      name: w.name, type: w.type, value: w.value,
      options: Array.isArray(w.options?.values) ? w.options.values : null,
      min: w.options?.min ?? null, max: w.options?.max ?? null,
    }));
    return {id: n.id, type: n.type, title: n.title, registered: n.type in LiteGraph.registered_node_types,
            has_errors: !!n.has_errors, box: [r[0], r[1] - badgeHeight, r[2], r[3] + badgeHeight], widgets};
  });
  const serialized = app.graph.serialize().nodes.map((n) => ({id: n.id, widgets_values: n.widgets_values}));
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map((d) => d.innerText.slice(0, 300));
  return {nodes, serialized, dialogs};
}"""

LOAD_TEMPLATE_JS = """async ([module, id]) => {
  const response = await fetch(`/api/workflow_templates/${module}/${id}.json`);  // as the templates dialog does
  await app.loadGraphData(await response.json(), true, true, id);
  const store = app.extensionManager.workflow;  // one tab in the pictures: close the earlier ones
  for (const workflow of [...store.openWorkflows]) {
    if (workflow !== store.activeWorkflow) await store.closeWorkflow(workflow);
  }
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
}"""

# The frontend fits a workflow without a saved view into 75% of the canvas; the pictures fill 95% of it, so that
# nodes keep their text (below ~57% zoom the frontend draws nodes as bare boxes).
FIT_VIEW_JS = """async () => {
  const boxes = app.graph.nodes.map((n) => n.boundingRect);
  const x0 = Math.min(...boxes.map((r) => r[0])) - 10, y0 = Math.min(...boxes.map((r) => r[1])) - 40;
  const x1 = Math.max(...boxes.map((r) => r[0] + r[2])) + 10, y1 = Math.max(...boxes.map((r) => r[1] + r[3])) + 10;
  const ds = app.canvas.ds;
  ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.95});
  app.canvas.setDirty(true, true);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const canvas = app.canvas.canvas.getBoundingClientRect();  // the graph's box on the page (for the thumbnail)
  return {x: canvas.left + (x0 + ds.offset[0]) * ds.scale, y: canvas.top + (y0 + ds.offset[1]) * ds.scale,
          width: (x1 - x0) * ds.scale, height: (y1 - y0) * ds.scale};
}"""

SET_WIDGETS_JS = """(changes) => {
  const missing = [];
  for (const [type, values] of Object.entries(changes)) {
    const nodes = app.graph.nodes.filter((n) => n.type === type);
    if (!nodes.length) missing.push(type);
    for (const node of nodes) {
      for (const [name, value] of Object.entries(values)) {
        const widget = (node.widgets || []).find((w) => w.name === name);
        if (!widget) { missing.push(`${type}.${name}`); continue; }
        widget.value = value;
        widget.callback?.(value, app.canvas, node);
      }
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return missing;
}"""


# --------------------------------------------------------------------------
# Requirements, pictures
# --------------------------------------------------------------------------


def _chromium() -> str | None:
    """A Chromium/Chrome executable: $MMV_CHROMIUM, else the first of the usual names on PATH."""
    explicit = os.environ.get("MMV_CHROMIUM", "").strip()
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _require_browser() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("browser tests need playwright's Python client: pip install -e .[dev] (or pip install playwright)")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("browser tests need Chromium: apt-get install -y chromium (or set MMV_CHROMIUM=/path/to/chrome)")
    return chromium


def _output_folder(variable: str, tmp_path_factory) -> Path:
    folder = os.environ.get(variable, "").strip()
    path = Path(folder).resolve() if folder else tmp_path_factory.mktemp(variable.lower())
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """Where the README's pictures go: $MMV_PICTURES (make pictures: docs/pictures), else a temporary folder."""
    return _output_folder("MMV_PICTURES", tmp_path_factory)


@pytest.fixture(scope="module")
def thumbnails(tmp_path_factory) -> Path:
    """Where the templates dialog's thumbnails go: $MMV_THUMBNAILS (make pictures: workflows), else a temporary
    folder (the dialog test then checks the committed ones)."""
    return _output_folder("MMV_THUMBNAILS", tmp_path_factory)


def _save_picture(png: bytes, path: Path) -> Path:
    """Write ``png`` as a 256-colour PNG (the UI's flat colours survive; a few times smaller), atomically."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp, optimize=True)
    os.replace(tmp, path)
    assert path.stat().st_size < PICTURE_LIMIT, f"{path.name}: {path.stat().st_size} bytes"
    return path


# --------------------------------------------------------------------------
# Server: tiny models, placeholders for the shipped names, input files
# --------------------------------------------------------------------------


def _write_placeholders(models: Path, object_info: dict) -> list[str]:
    """Empty files/folders named as the shipped workflows name them, where the tiny models do not exist already.

    The values are read by input name (``ui_to_api``), so nothing here depends on the widgets' order.
    """
    written = []
    for path in WORKFLOWS:
        api = comfy_host.ui_to_api(json.loads(path.read_text(encoding="utf-8")), object_info)
        for node in api.values():
            for input_name, value in node["inputs"].items():
                spot = MODEL_COMBOS.get((node["class_type"], input_name))
                if spot is None or not isinstance(value, str):
                    continue
                folder, kind = spot
                target = models / folder / ("models" if kind == "pack" else "") / value
                if target.exists():
                    continue
                if kind == "folder":
                    (target / "transformer").mkdir(parents=True)
                elif kind == "pack":
                    target.mkdir(parents=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
                written.append(str(target.relative_to(models)))
    return written


def _write_identity_clip(path: Path) -> int:
    """24 frames of 160x128 (the size of face.png): the reference face moving right (0-9), another face (10-15),
    the reference again (16-19), no face (20-23). Returns the number of frames with a face."""
    import numpy as np
    import torch

    from magicmirror_video.models.video_io import write_video
    from magicmirror_video.testing import tiny_faces

    frames = []
    for t in range(24):
        seed = 7 if 10 <= t < 16 else 0
        radius = None if t >= 20 else 40
        frames.append(tiny_faces.synthetic_face_image(160, 128, center=(44 + 2 * t, 80), radius=radius, seed=seed))
    write_video(str(path), torch.from_numpy(np.stack(frames)).float() / 255.0, fps=8)
    return 20


def _write_dualreal_adapter(path: Path, model_folder: Path) -> None:
    """A random DualReal adapter for the tiny model with 2 block groups and a controller whose last layer is far from
    its zero init, so the blend plot shows α varying over steps and groups (random weights: no meaning)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from magicmirror_video.models.dualreal import DualRealAdapters, DualRealConfig

    transformer = CogVideoXTransformer3DModel.from_pretrained(str(model_folder / "transformer"))
    torch.manual_seed(1)
    adapters = DualRealAdapters(DualRealConfig.for_transformer(transformer, condition_dim=16, hidden_dim=8, n_groups=2))
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            p.add_(torch.randn_like(p) * (2.0 if name.startswith("controller.fusion_net.3") else 0.05))
    torch.save(adapters.state_dict(), path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ComfyUI with the pack, the tiny models of the method workflows, placeholders and the input files."""
    paths = comfy_host.require_comfyui()
    _require_browser()  # skip before building anything
    import test_host_workflows as host_workflows

    tmp = tmp_path_factory.mktemp("host_frontend")
    models = tmp / "models"
    host_workflows._build_model_root(models, error_cases=False)
    _write_dualreal_adapter(models / "dualreal" / "adapter.pth", models / "CogVideo" / "tiny-t2v")
    for folder, _ in MODEL_COMBOS.values():  # mapped at start-up; the placeholders come once /object_info answers
        (models / folder).mkdir(parents=True, exist_ok=True)
    srv = comfy_host.ComfyServer(*paths, pack_dir=PACK_DIR, model_root=models, tmp_dir=tmp / "comfy")
    user = srv.base_dir / "user" / "default"
    (user / "workflows").mkdir(parents=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")
    host_workflows._write_example_png(srv.input_dir / "example.png")
    host_workflows._write_face_pngs(srv.input_dir)
    srv.identity_clip_faces = _write_identity_clip(srv.input_dir / IDENTITY_CLIP)
    with srv:
        _write_placeholders(models, srv.object_info())
        srv.object_info(refresh=True)
        yield srv


# --------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------


class Console:
    """Console errors and warnings and uncaught page errors of one page, as one line each.

    Messages located at other hosts are left out: the frontend's own calls to api.comfy.org fail here (no network);
    so is the browser's own favicon request.
    """

    def __init__(self, page, origin: str):
        self.netloc = urlsplit(origin).netloc
        self.entries: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.entries.append(f"page error: {error}"))

    def _console(self, message) -> None:
        if message.type not in ("error", "warning"):
            return
        url = (message.location or {}).get("url", "")
        if url and urlsplit(url).netloc != self.netloc:
            return
        if urlsplit(url).path == "/favicon.ico":  # asked by the browser once per session, not by the page
            return
        self.entries.append(f"{message.type}: {message.text} [{urlsplit(url).path}]")

    def take(self) -> list[str]:
        entries, self.entries = self.entries, []
        return entries


def _is_custom_node(info: dict) -> bool:
    return str(info.get("python_module", "")).startswith("custom_nodes.")


def _open_page(browser, url: str, without_custom_nodes: bool = False):
    """The frontend in a new page, loaded and idle: (page, Console). ``without_custom_nodes``: /api/object_info is
    answered without the custom nodes' definitions (what the page shows without the pack)."""
    page = browser.new_page(viewport=VIEWPORT)
    console = Console(page, url)
    if without_custom_nodes:
        def core_only(route):
            response = route.fetch()
            info = {name: spec for name, spec in response.json().items() if not _is_custom_node(spec)}
            route.fulfill(response=response, json=info)

        page.route("**/api/object_info", core_only)
    page.goto(url)
    page.wait_for_function("() => window.app?.graph && window.app.canvas && window.LiteGraph", timeout=120_000)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1000)
    return page, console


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # Chromium refuses root else
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_require_browser(), args=args)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def frontend(browser, server):
    """(page, Console, errors while the page loaded) of the frontend with the pack."""
    page, console = _open_page(browser, server.url)
    yield page, console, console.take()
    page.close()


def _load_template(page, server, stem: str) -> None:
    page.evaluate(LOAD_TEMPLATE_JS, [server.pack_name, stem])
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)


def _backend_view(prompt: dict, object_info: dict) -> dict:
    """The prompt as the server reads it: only the inputs each node class declares. A frontend extension's own
    widgets (PreviewAny's "preview" text) are sent along and ignored by the server; they must not carry links."""
    view = {}
    for node_id, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        declared = set(spec.get("required") or {}) | set(spec.get("optional") or {})
        extra = {k: v for k, v in node["inputs"].items() if k not in declared}
        assert not any(isinstance(v, list) for v in extra.values()), (node_id, extra)
        view[node_id] = {**node, "inputs": {k: v for k, v in node["inputs"].items() if k in declared}}
    return view


def _picture(page, path: Path, thumbnail: Path | None = None) -> Path:
    """Screenshot of the page with the graph filling the canvas; ``thumbnail``: also the graph alone, letterboxed
    into a square JPEG (what the templates dialog shows for ``workflows/<name>.jpg``)."""
    from PIL import Image

    graph = page.evaluate(FIT_VIEW_JS)
    page.wait_for_timeout(300)
    _save_picture(page.screenshot(), path)
    if thumbnail is not None:
        shot = Image.open(io.BytesIO(page.screenshot(clip=graph))).convert("RGB")
        side = max(shot.size)
        square = Image.new("RGB", (side, side), shot.getpixel((0, 0)))  # the canvas background
        square.paste(shot, ((side - shot.width) // 2, (side - shot.height) // 2))
        tmp = thumbnail.with_suffix(".tmp.jpg")
        square.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.LANCZOS).save(tmp, quality=85, optimize=True)
        os.replace(tmp, thumbnail)
    return path


def _overlaps(nodes: list[dict]) -> list[str]:
    """Pairs of nodes whose boxes intersect (touching edges are fine)."""
    found = []
    for a, b in itertools.combinations(nodes, 2):
        (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
        dx = min(ax + aw, bx + bw) - max(ax, bx)
        dy = min(ay + ah, by + bh) - max(ay, by)
        if dx > 0 and dy > 0:
            found.append(f"{a['id']} {a['title']!r} and {b['id']} {b['title']!r} overlap by {dx:.0f}x{dy:.0f} px")
    return found


def _widget_errors(state: dict, workflow: dict) -> list[str]:
    """Widgets whose value changed on loading, is not one of the combo's options, or is outside min..max."""
    errors = []
    shipped = {node["id"]: node.get("widgets_values") for node in workflow["nodes"]}
    for node in state["serialized"]:
        if node.get("widgets_values") != shipped[node["id"]]:
            errors.append(f"node {node['id']}: loaded as {node.get('widgets_values')}, "
                          f"the file has {shipped[node['id']]}")
    for node in state["nodes"]:
        for widget in node["widgets"]:
            where = f"node {node['id']} ({node['type']}) {widget['name']}={widget['value']!r}"
            if widget["options"] is not None and widget["value"] not in widget["options"]:
                errors.append(f"{where}: not one of {widget['options'][:8]}")
            if isinstance(widget["value"], (int, float)) and not isinstance(widget["value"], bool):
                if widget["min"] is not None and widget["value"] < widget["min"]:
                    errors.append(f"{where}: below min {widget['min']}")
                if widget["max"] is not None and widget["value"] > widget["max"]:
                    errors.append(f"{where}: above max {widget['max']}")
    return errors


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_host_frontend_page_loads_without_errors_of_the_pack(browser, server, frontend):
    page, _, errors = frontend
    pack_nodes = sorted(name for name, info in server.object_info().items() if _is_custom_node(info))
    assert len(pack_nodes) >= 15, pack_nodes
    registered = page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
    assert set(pack_nodes) <= set(registered), sorted(set(pack_nodes) - set(registered))
    core_page, core_console = _open_page(browser, server.url, without_custom_nodes=True)
    try:
        core_registered = core_page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
        assert not set(pack_nodes) & set(core_registered)  # the baseline page really lacks the pack
        baseline = set(core_console.take())
    finally:
        core_page.close()
    assert not [e for e in errors if e not in baseline], f"errors only with the pack: {errors}\nwithout: {baseline}"


def test_host_frontend_lists_every_shipped_workflow_as_a_template(server):
    templates = server.get_json("/api/workflow_templates")
    assert sorted(templates.get(server.pack_name, [])) == [p.stem for p in WORKFLOWS], templates


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_host_frontend_loads_the_shipped_workflow(server, frontend, pictures, thumbnails, path):
    page, console, _ = frontend
    workflow = json.loads(path.read_text(encoding="utf-8"))
    console.take()
    _load_template(page, server, path.stem)
    state = page.evaluate(GRAPH_STATE_JS)
    errors = console.take()

    assert len(state["nodes"]) == len(workflow["nodes"])
    missing = [f"{n['id']} {n['type']}" for n in state["nodes"] if not n["registered"] or n["has_errors"]]
    assert not missing, f"node types the frontend does not know: {missing}"
    assert not state["dialogs"], state["dialogs"]
    assert not errors, "\n".join(errors)
    assert not _widget_errors(state, workflow), "\n".join(_widget_errors(state, workflow))
    frontend_prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    info = server.object_info()
    assert _backend_view(frontend_prompt, info) == comfy_host.ui_to_api(workflow, info)
    assert not _overlaps(state["nodes"]), "\n".join(_overlaps(state["nodes"]))
    _picture(page, pictures / f"{path.stem}.png", thumbnails / f"{path.stem}.jpg")


def test_host_frontend_templates_dialog_shows_a_thumbnail_per_workflow(server, frontend):
    """Workflow -> Browse Templates -> the pack: every card's picture (``workflows/<name>.jpg``, which the frontend
    asks for next to each template) is served as a JPEG and shows in the dialog without a console error."""
    import urllib.request

    for path in WORKFLOWS:
        url = f"{server.url}/api/workflow_templates/{server.pack_name}/{path.stem}.jpg"
        with urllib.request.urlopen(url, timeout=30) as answer:  # 404 (HTTPError) when the thumbnail is missing
            assert answer.read(3) == b"\xff\xd8\xff", url
    page, console, _ = frontend
    console.take()
    answers = []

    def record(response) -> None:
        if f"/workflow_templates/{server.pack_name}/" in response.url:
            answers.append((response.status, response.url))

    page.on("response", record)
    try:
        page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.locator(".p-dialog").get_by_text(server.pack_name, exact=True).first.click()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(500)
        # The cards load their pictures as they scroll into view (as blob: URLs); the ones with a source must show.
        shown = page.evaluate("""() => Array.from(document.querySelectorAll('.p-dialog img'))
          .filter((img) => img.getAttribute('src')).map((img) => img.complete && img.naturalWidth > 0)""")
        page.keyboard.press("Escape")
        page.locator(".p-dialog").first.wait_for(state="detached")
    finally:
        page.remove_listener("response", record)
    assert answers and all(status == 200 for status, _ in answers), answers
    assert shown and all(shown), shown
    assert not console.take()


def _decode_frames(path: Path):
    import numpy as np

    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_host_frontend_queues_the_combined_workflow_and_shows_its_results(server, frontend, pictures):
    """As a user: open the template, pick the (tiny) model and a small size in the widgets, press Run."""
    page, console, _ = frontend
    _load_template(page, server, COMBINED)
    console.take()
    missing = page.evaluate(SET_WIDGETS_JS, {
        "MMV_CogVideoXModelLoader": {"model": "tiny-t2v", "precision": "fp32", "offload": "none"},
        "MMV_CogVideoXSampler": {"width": WIDTH, "height": HEIGHT, "num_frames": FRAMES, "steps": STEPS},
        "MMV_MagicMirrorFaceEncoderLoader": {"precision": "fp32", "provider": "CPU"},
    })
    assert not missing, missing
    with page.expect_request(lambda r: r.method == "POST" and urlsplit(r.url).path == "/api/prompt") as sent:
        page.get_by_role("button", name="Run", exact=True).click()
    request = sent.value
    body = request.post_data_json
    prompt = body["prompt"]
    info = server.object_info()
    assert _backend_view(prompt, info) == comfy_host.ui_to_api(body["extra_data"]["extra_pnginfo"]["workflow"], info)
    entry = server.wait(request.response().json()["prompt_id"], timeout=900)
    assert comfy_host.format_history_error(entry) is None, comfy_host.format_history_error(entry)

    (save_id,) = [nid for nid, node in prompt.items() if node["class_type"] == "SaveVideo"]
    (video,) = server.output_files(entry, save_id)
    assert _decode_frames(video).shape == (FRAMES, HEIGHT, WIDTH, 3)
    (plot_id,) = [nid for nid, node in prompt.items() if node["class_type"] == "MMV_DualRealBlendPlot"]
    (preview_id,) = [nid for nid, node in prompt.items()
                     if node["class_type"] == "PreviewImage" and node["inputs"]["images"][0] == plot_id]
    (plot,) = server.output_files(entry, preview_id)
    from PIL import Image

    with Image.open(plot) as image:
        assert image.width > 24 * STEPS, image.size  # one column per step
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    _save_picture(buffer.getvalue(), pictures / "dualreal_blend_plot.png")

    # The frontend shows what ran: the plot in its Preview Image node.
    page.wait_for_function("(id) => app.graph.getNodeById(Number(id))?.imgs?.[0]?.complete", arg=preview_id,
                           timeout=60_000)
    page.wait_for_timeout(500)
    assert not console.take()
    _picture(page, pictures / f"{COMBINED}_after_run.png")


def test_host_identity_score_curve_on_a_video_file(server, pictures):
    """Core's Load Video -> Get Video Components -> Identity Score against face.png: the report counts the frames
    with a face (the reference and another face; none in the last 4), the plot is the README's identity curve."""
    api = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": IDENTITY_CLIP}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "4": {"class_type": "MMV_MagicMirrorFaceEncoderLoader", "inputs": {
            "insightface": "antelopev2", "provider": "CPU", "photomaker": "photomaker-v2.bin", "precision": "fp32"}},
        "5": {"class_type": "MMV_IdentityScore", "inputs": {"face_encoder": ["4", 0], "frames": ["2", 0],
                                                            "reference": ["3", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
    }
    entry = server.run_prompt(api, timeout=600)
    report = entry["outputs"]["5"]["text"][0]
    print(f"\nIdentity Score on the synthetic clip:\n{report}")
    assert f"mean over {server.identity_clip_faces}/24 frames with a face" in report, report
    (plot,) = server.output_files(entry, "6")
    _save_picture(plot.read_bytes(), pictures / "identity_curve.png")
