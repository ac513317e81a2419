"""See a graft run in `mlflow ui` (and TensorBoard) through a headless Chromium, as a person would.

Trains nothing: give it a run folder trained with `--log mlflow --tracking-uri URI` (an MLflow
server at URI, e.g. `mlflow ui --backend-store-uri sqlite:///ml.db --port 5055`). It opens the
run's page, its metric charts, its artifacts and the experiment's logged models, saves a
screenshot of each in --out, and prints whether each page shows what it should (run name,
metrics, model, report) or exits 1 naming what is missing. With `--tensorboard URL` (a
`tensorboard --logdir RUN/tensorboard` server) it checks the curves there too. Needs Debian's
chromium and chromium-driver, and selenium (graft[dev]).

    python scripts/check_tracker_ui.py runs/demo --out /tmp/tracker-ui \
        --tensorboard http://127.0.0.1:6006
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _wait_for(driver, texts: list[str], seconds: float = 60.0) -> list[str]:
    """The texts of `texts` not on the page once it settled (empty: all shown)."""
    deadline = time.monotonic() + seconds
    missing = texts
    while time.monotonic() < deadline:
        # TensorBoard breaks a card's title at the slash (acc / train): compare without breaks
        body = driver.find_element("tag name", "body").text.replace("\n", "")
        missing = [t for t in texts if t not in body]
        if not missing:
            break
        time.sleep(1.0)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder trained with --log mlflow")
    parser.add_argument("--out", type=Path, default=Path("tracker-ui"))
    parser.add_argument("--tensorboard", help="a TensorBoard server showing RUN/tensorboard")
    parser.add_argument(
        "--mlflow", help="the MLflow UI serving the run's store [default: its tracking URI]"
    )
    args = parser.parse_args()
    record = json.loads((args.run / "tracking.json").read_text())["mlflow"]
    uri, run_id, experiment = record["uri"], record["run_id"], record["experiment"]
    uri = args.mlflow or uri
    if not uri.startswith(("http://", "https://")):
        parser.error(f"the run logged to {uri}: give the UI serving it with --mlflow URL")
    args.out.mkdir(parents=True, exist_ok=True)
    pages = {
        "run": (f"{uri}/#/experiments/{experiment}/runs/{run_id}", [args.run.name, "Metrics"]),
        "metrics": (
            f"{uri}/#/experiments/{experiment}/runs/{run_id}/model-metrics",
            ["final_val_accuracy"],
        ),
        "models": (f"{uri}/#/experiments/{experiment}/models", ["model"]),
        "artifacts": (
            f"{uri}/#/experiments/{experiment}/runs/{run_id}/artifacts",
            ["report.html", "graft_model"],
        ),
    }
    if args.tensorboard:
        pages["tensorboard"] = (
            f"{args.tensorboard}/#timeseries",
            ["loss/train", "loss/val", "acc/train", "acc/val"],
        )
    driver = _browser(args.out / "profile")
    failed = False
    try:
        for name, (url, texts) in pages.items():
            driver.get(url)
            if name == "metrics":  # the charts render as they scroll in: search for the one
                _wait_for(driver, ["final_val_f1"])
                box = driver.find_element("css selector", "input[placeholder*='Search metric']")
                box.send_keys("final_val_accuracy")
            missing = _wait_for(driver, texts)
            driver.save_screenshot(str(args.out / f"{name}.png"))
            status = "ok" if not missing else f"MISSING {', '.join(missing)}"
            failed |= bool(missing)
            print(f"{name:10s} {status:10s} {url}")
    finally:
        driver.quit()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
