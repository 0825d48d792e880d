"""Offline hardening: the CJK font reaches ultralytics and matplotlib, switches are set, doctor reports."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _ink(img: Image.Image) -> int:
    a = np.asarray(img.convert("L"))
    return int((a < 128).sum())


def test_cjk_font_renders_chinese_glyphs_not_empty_boxes(tmp_path):
    from PIL import ImageFont

    from wanwu.offline import cjk_font

    font_path = cjk_font(tmp_path)
    assert font_path is not None and font_path.is_file()
    font = ImageFont.truetype(str(font_path), 32)
    assert font.getname()[0] == "Noto Sans CJK SC"
    # Different characters give different glyphs; a missing-glyph font draws the same box for all of them.
    from PIL import ImageDraw

    shapes = []
    for ch in "猫狗鸟":
        im = Image.new("L", (40, 40), 255)
        ImageDraw.Draw(im).text((2, 0), ch, font=font, fill=0)
        shapes.append(np.asarray(im))
    assert _ink(Image.fromarray(shapes[0])) > 30
    assert not np.array_equal(shapes[0], shapes[1]) and not np.array_equal(shapes[1], shapes[2])


def test_harden_sets_every_switch_in_a_fresh_process(tmp_path):
    code = (
        "import os, json; from wanwu.offline import harden; harden(r'%s');"
        "import ultralytics.utils as u; from ultralytics.utils.checks import check_font;"
        "print(json.dumps({k: os.environ.get(k) for k in ['YOLO_OFFLINE','GX_ANALYTICS_ENABLED','MLFLOW_TRACKING_URI']}"
        " | {'config': str(u.USER_CONFIG_DIR), 'font': str(check_font('Arial.Unicode.ttf'))}))"
    ) % tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "MLFLOW_", "GX_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["YOLO_OFFLINE"] == "true"
    assert got["GX_ANALYTICS_ENABLED"] == "false"
    assert got["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert got["config"] == str(tmp_path / ".wanwu" / "Ultralytics")
    # ultralytics finds the CJK font locally: it would otherwise try to download Arial.Unicode.ttf
    assert got["font"] == str(tmp_path / ".wanwu" / "Ultralytics" / "Arial.Unicode.ttf")


def test_matplotlib_plot_with_chinese_class_names_has_glyphs(tmp_path):
    code = f"""
import warnings, matplotlib
matplotlib.use('Agg')
from wanwu.offline import harden, cjk_font, register_matplotlib_font
harden(r'{tmp_path}')
register_matplotlib_font(cjk_font(r'{tmp_path}'))
import matplotlib.pyplot as plt
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(['猫', '向日葵', '自由女神像'], [3, 2, 1]); ax.set_title('类别分布')
    fig.savefig(r'{tmp_path / "plot.png"}', dpi=80)
print('MISSING' if any('missing from font' in str(x.message) for x in w) else 'OK')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_doctor_reports_each_check_with_a_fix(tmp_path):
    from wanwu.offline import checks

    (tmp_path / "params.yaml").write_text(f"project:\n  ontology: {ROOT / 'ontology.yaml'}\n")
    results = {c.name: c for c in checks(tmp_path)}
    assert {"params", "ontology", "offline mode", "CJK font", "MLflow store", "DVC", "device", "free disk"} <= set(
        results
    )
    assert results["CJK font"].ok and results["ontology"].ok and results["params"].ok
    assert not results["DVC"].ok and "dvc init" in results["DVC"].fix  # tmp_path is no DVC project


def test_cli_help_imports_nothing_heavy():
    heavy = "('torch', 'ultralytics', 'prefect', 'mlflow', 'pandas')"
    code = f"import sys, wanwu.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_out = subprocess.run([sys.executable, "-m", "wanwu.cli", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0
    for command in ("run", "stage", "doctor"):
        assert command in help_out.stdout
