"""The Gradio workbench: Runs, Compare, Launch, Try it. Every view reads files (mmpeft.ui.catalog, .compare) or
calls the CLI/API (mmpeft.ui.launch, mmpeft.predict); the app itself holds nothing that is not on disk."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

import mmpeft
from mmpeft.artifacts.loading import MANIFEST
from mmpeft.artifacts.runs import read_run, run_data
from mmpeft.core.io import PROJECT_ROOT
from mmpeft.ui.catalog import COLUMNS, UI_DIR, OutsideError, details, inside, scan
from mmpeft.ui.compare import comparison_plots, comparison_rows, markdown_table
from mmpeft.ui.launch import Checked, Launcher

LOG_REFRESH_SECONDS = 2.0
PREDICT_MISSING = "`mmpeft.predict` is not available in this version of mmpeft, so Try it is switched off."


def shipped_recipes() -> list[str]:
    return sorted(p.name for p in (PROJECT_ROOT / "recipes").glob("*.yaml"))


class Workbench:
    """State shared by the tabs: the runs folder and its launcher."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir).resolve()
        if self.runs_dir.exists() and not self.runs_dir.is_dir():
            raise FileExistsError(f"RUNS_DIR {runs_dir} is a file, not a folder; give the folder runs are written to "
                                  "(default: runs)")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = Launcher(self.runs_dir)
        self.uploads = self.runs_dir / UI_DIR / "uploads"

    def entries(self):
        return scan(self.runs_dir, self.launcher.statuses())

    def table(self):
        entries = self.entries()
        paths = [e.path for e in entries]
        return [e.row() for e in entries], gr.update(choices=paths), gr.update(choices=paths)

    def show(self, relative: str | None):
        if not relative:
            return "*Pick a run in the table.*", "", [], "", ""
        try:
            found = details(self.runs_dir, relative, self.launcher.statuses(), self._launch_log(relative))
        except (OutsideError, FileNotFoundError) as error:
            return f"**{error}**", "", [], "", ""
        entry = found.entry
        head = (f"**{entry.path}**: {entry.kind}, **{entry.status}**; recipe `{entry.recipe}`, method "
                f"`{entry.method}`, backbone `{entry.backbone}`")
        return head, found.report, [(str(p), p.name) for p in found.plots], found.recipe, found.log

    def log_tick(self, relative: str | None):
        """The timer's refresh: only a running folder's status and log move."""
        if not relative:
            return gr.update(), gr.update()
        head, _, _, _, log = self.show(relative)
        return head, log

    def _launch_log(self, relative: str) -> Path | None:
        path = self.launcher.records / f"{relative.replace('/', '__')}.log"
        return path if path.is_file() else None

    def stop(self, relative: str | None) -> str:
        return self.launcher.stop(relative) if relative else "pick a running launch first"

    def resume(self, relative: str | None) -> str:
        if not relative:
            return "pick an interrupted run first"
        entry = next((e for e in self.entries() if e.path == relative), None)
        if entry is None or entry.status not in ("interrupted", "failed"):
            return f"{relative}: only an interrupted or failed run can be resumed"
        try:
            record = self.launcher.resume(relative, entry.kind)
        except ValueError as error:  # a folder that cannot be resumed itself: say what to resume instead
            return f"{relative}: {error}"
        return f"resumed {relative} (pid {record['pid']})"

    def compare(self, selected: list[str] | None):
        selected = selected or []
        try:
            rows = comparison_rows(self.runs_dir, selected)
            plots = [(str(plot), f"on one axis: {plot.name}") for plot in
                     comparison_plots(rows, self.runs_dir / UI_DIR / "compare")]
            plots += [(str(plot), f"{relative}: {plot.name}") for relative in selected
                      for plot in details(self.runs_dir, relative).plots]
        except (OutsideError, FileNotFoundError) as error:
            return f"**{error}**", []
        return markdown_table(rows), plots

    def load_recipe_text(self, shipped: str | None, uploaded: str | None):
        """(YAML text, name) of a shipped recipe or an uploaded file (copied into RUNS_DIR/.ui/uploads first)."""
        if uploaded:
            self.uploads.mkdir(parents=True, exist_ok=True)
            kept = inside(self.uploads, Path(uploaded).name)
            shutil.copyfile(uploaded, kept)
            return kept.read_text(), kept.name
        if shipped:
            path = inside(PROJECT_ROOT / "recipes", shipped)
            return path.read_text(), path.name
        return "", ""

    def check(self, text: str, name: str, overrides: str, *form: str) -> str:
        if not text.strip():
            return "**Nothing to check**: pick or upload a recipe."
        checked, staged = self.launcher.check(text, name or "recipe", form_overrides(form) + overrides.split())
        shutil.rmtree(staged.parent, ignore_errors=True)  # only a started recipe keeps its file
        return checked_markdown(checked)

    def start(self, text: str, name: str, overrides: str, *form: str):
        if not text.strip():
            return "**Nothing to start**: pick or upload a recipe.", self.launch_rows()
        result = self.launcher.start(text, name or "recipe", form_overrides(form) + overrides.split())
        if isinstance(result, Checked):
            return checked_markdown(result, "not started: "), self.launch_rows()
        return (f"**started** `{' '.join(result['command'][2:])}` (pid {result['pid']}); it writes "
                f"`{result['folder']}` under RUNS_DIR.", self.launch_rows())

    def launch_rows(self):
        return [[r["folder"], r["status"], r["pid"], r["started"], " ".join(r["command"][2:])]
                for r in self.launcher.launches()]

    def predict_sources(self) -> list[str]:
        finished = [e.path for e in self.entries() if e.status == "finished" and e.kind in ("run", "cell", "trial")]
        exports = [p.parent.relative_to(self.runs_dir).as_posix() for p in self.runs_dir.glob(f"**/{MANIFEST}")]
        return finished + exports

    def test_images(self, source: str | None, limit: int = 12):
        """A few images of the run's own test split (as `mmpeft run` split it): choices for the picker."""
        if not source:
            return gr.update(choices=[]), "pick a run first"
        try:
            data = run_data(read_run(inside(self.runs_dir, source), untrained=True))  # zero-shot runs predict too
        except (ValueError, FileNotFoundError) as error:
            return gr.update(choices=[]), f"**{error}**"
        files = [(f"{Path(e.image).name} ({data.labels.names[e.label]})", str(e.image)) for e in data.test
                 if isinstance(e.image, (str, Path)) and Path(e.image).is_file()][:limit]
        note = f"{len(files)} test images listed" if files else "this run's images are not files (upload some)"
        return gr.update(choices=files, value=[]), note

    def predict(self, source: str | None, images: list[str] | None, labels: str, question: str, top_k: int,
                picked: list[str] | None = None):
        images = [*(images or []), *(picked or [])]
        if not source or not images:
            return [], "pick a source and upload or pick at least one image"
        names = [label.strip() for label in labels.split(",") if label.strip()] or None
        try:
            folder = inside(self.runs_dir, source)
            rows = mmpeft.predict(str(folder), list(images), labels=names, top_k=int(top_k),
                                  question=question.strip() or None)
        except (ValueError, FileNotFoundError) as error:  # bad source, labels or images: say which
            return [], f"**{error}**"
        table = []
        for row in rows:
            shown = row.get("error") or row.get("answer") or ", ".join(
                f"{item['label']} {item['score']:.3f}" for item in row.get("labels", []))
            table.append([Path(row["path"]).name, shown])
        return table, f"{len(rows)} image(s) through mmpeft.predict"


def checked_markdown(checked: Checked, prefix: str = "") -> str:
    if checked.ok:
        return f"**valid** `{checked.command}` recipe `{checked.name}`.\n\n```yaml\n{checked.resolved}```"
    problems = "\n".join(f"- `{p}`" for p in checked.problems)
    return f"**{prefix}{len(checked.problems)} problem(s)** in the `{checked.command}` recipe:\n\n{problems}"


def build_app(runs_dir: str | Path) -> gr.Blocks:
    bench = Workbench(runs_dir)
    with gr.Blocks(title="mmpeft workbench") as app:
        gr.Markdown(f"# mmpeft workbench\nRuns folder: `{bench.runs_dir}`")
        with gr.Tab("Runs", id="runs"):
            picker, compare_picker = runs_tab(bench, app)
        with gr.Tab("Compare", id="compare"):
            compare_tab(bench, compare_picker)
        with gr.Tab("Launch", id="launch"):
            launch_tab(bench)
        with gr.Tab("Try it", id="try"):
            try_tab(bench)
    return app


def runs_tab(bench: Workbench, app: gr.Blocks):
    refresh = gr.Button("Refresh", elem_id="refresh-runs")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="runs-table", show_search="search",
                         max_height=360)
    picker = gr.Dropdown(label="Folder", choices=[], elem_id="folder-picker", allow_custom_value=True)
    compare_picker = gr.Dropdown(label="Compare", multiselect=True, choices=[], render=False, elem_id="compare-picker")
    with gr.Row():
        stop, resume = gr.Button("Stop (SIGINT)", elem_id="stop-run"), gr.Button("Resume", elem_id="resume-run")
    action = gr.Markdown(elem_id="run-action")
    head = gr.Markdown(elem_id="run-head")
    with gr.Tab("Report"):
        report = gr.Markdown(elem_id="report")
    with gr.Tab("Plots"):
        plots = gr.Gallery(columns=3, height=420, elem_id="plots")
    with gr.Tab("Recipe"):
        recipe = gr.Code(language="yaml", interactive=False, elem_id="recipe-view")
    with gr.Tab("Log"):
        log = gr.Textbox(lines=14, max_lines=14, autoscroll=True, elem_id="log-tail", label="log tail")
    timer = gr.Timer(LOG_REFRESH_SECONDS)
    outputs = [table, picker, compare_picker]
    for trigger in (app.load, refresh.click):
        trigger(bench.table, outputs=outputs)
    table.select(_selected_path, None, picker)
    picker.change(bench.show, picker, [head, report, plots, recipe, log])
    timer.tick(bench.log_tick, picker, [head, log])
    stop.click(bench.stop, picker, action)
    resume.click(bench.resume, picker, action)
    return picker, compare_picker


def _selected_path(event: gr.SelectData) -> str | None:
    return event.row_value[0] if event.row_value else None


def compare_tab(bench: Workbench, picker: gr.Dropdown) -> None:
    picker.render()
    go = gr.Button("Compare", elem_id="compare-go")
    table = gr.Markdown(elem_id="compare-table")
    plots = gr.Gallery(columns=4, height=460, elem_id="compare-plots")
    go.click(bench.compare, picker, [table, plots])


def launch_tab(bench: Workbench) -> None:
    with gr.Row():
        shipped = gr.Dropdown(label="Shipped recipe", choices=shipped_recipes(), elem_id="shipped-recipe")
        upload = gr.File(label="or upload a recipe", file_types=[".yaml", ".yml"], type="filepath",
                         elem_id="recipe-upload")
    name = gr.Textbox(label="Recipe file name", elem_id="recipe-name")
    editor = gr.Code(language="yaml", label="Recipe (edit freely; checked as `mmpeft check` checks it)",
                     interactive=True, elem_id="recipe-editor")
    with gr.Row():  # the settings people change most, as a form: a filled field is an override
        form = [gr.Textbox(label=key, placeholder="the recipe's", elem_id=f"form-{key.replace('.', '-')}")
                for key in FORM_KEYS]
    overrides = gr.Textbox(label="Overrides (key.sub=value, space separated)", elem_id="recipe-overrides")
    with gr.Row():
        check, start = gr.Button("Check", elem_id="check-recipe"), gr.Button("Start", variant="primary",
                                                                             elem_id="start-recipe")
    status = gr.Markdown(elem_id="launch-status")
    launches = gr.Dataframe(headers=["folder", "status", "pid", "started", "command"], interactive=False,
                            elem_id="launches")
    shipped.change(lambda s: bench.load_recipe_text(s, None), shipped, [editor, name])
    upload.upload(lambda u: bench.load_recipe_text(None, u), upload, [editor, name])
    editor.change(form_placeholders, editor, form)
    check.click(bench.check, [editor, name, overrides, *form], status)
    start.click(bench.start, [editor, name, overrides, *form], [status, launches])
    gr.Timer(LOG_REFRESH_SECONDS * 2).tick(bench.launch_rows, None, launches)


FORM_KEYS = ("backbone.id", "method.name", "train.epochs", "train.lr", "train.batch_size", "output.name")


def form_overrides(values: tuple[str, ...] | list[str]) -> list[str]:
    """The form's filled fields as overrides (checked like any other), before the typed ones."""
    return [f"{key}={value.strip()}" for key, value in zip(FORM_KEYS, values) if value and value.strip()]


def form_placeholders(text: str) -> list:
    """Each form field shows the recipe's own value (as typed in the editor) as its placeholder."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        data = {}
    updates = []
    for key in FORM_KEYS:
        value: Any = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if key == "method.name" and isinstance(data, dict) and isinstance(data.get("method"), str):
            value = data["method"]  # `method: lora-r8`, a preset
        updates.append(gr.update(placeholder="the recipe's" if value is None else str(value)))
    return updates


def try_tab(bench: Workbench) -> None:
    if getattr(mmpeft, "predict", None) is None:
        gr.Markdown(PREDICT_MISSING, elem_id="predict-missing")
        return
    source = gr.Dropdown(label="Run or export", choices=bench.predict_sources(), elem_id="predict-source")
    images = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                     elem_id="predict-images")
    with gr.Row():
        picked = gr.Dropdown(label="or test images of the run", multiselect=True, choices=[], elem_id="predict-picked")
        list_test = gr.Button("List test images", elem_id="predict-list-test")
    labels = gr.Textbox(label="Labels, comma separated (dual encoder: zero-shot on new labels)",
                        elem_id="predict-labels")
    question = gr.Textbox(label="Question (generative backbones)", elem_id="predict-question")
    top_k = gr.Slider(1, 20, value=5, step=1, label="top k")
    go = gr.Button("Predict", elem_id="predict-go")
    note = gr.Markdown(elem_id="predict-note")
    results = gr.Dataframe(headers=["image", "prediction"], interactive=False, elem_id="predict-results")
    go.click(bench.predict, [source, images, labels, question, top_k, picked], [results, note])
    list_test.click(bench.test_images, source, [picked, note])
    gr.Button("Refresh sources").click(lambda: gr.update(choices=bench.predict_sources()), None, source)


def serve(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Start the workbench on host:port, serving files from `runs_dir` only."""
    check_port(host, port)
    app = build_app(runs_dir)
    print(f"mmpeft ui: {Path(runs_dir).resolve()} on http://{host}:{port} (Ctrl+C stops the UI; runs it launched "
          f"keep going)", flush=True)
    app.launch(server_name=host, server_port=port, allowed_paths=[str(Path(runs_dir).resolve())],
               prevent_thread_lock=not block, inbrowser=False, share=False, quiet=True)
    return app


def check_port(host: str, port: int) -> None:
    """Refuse a port that cannot be listened on (another `mmpeft ui`, any server) in one line, before Gradio starts."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: a port is a number from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror}); is another "
                             "`mmpeft ui` or server using it? Pick another with --port") from None
