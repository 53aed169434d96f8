"""The cloud service as its own process for the upload tests: ``python _upload_service.py
PORT FOLDER WORKER TIMEOUT_S``, the upload parser's worker replaced by a stand-in from
``_upload_crash`` (``encode`` keeps the real one)."""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    import _upload_crash
    import uvicorn

    from csi_cloud.api.app import create_app
    from csi_cloud.api.routes.predict import PARSER
    from csi_cloud.settings import CloudSettings

    port, folder, worker, timeout_s = sys.argv[1:5]
    if worker != "encode":
        PARSER.worker = getattr(_upload_crash, worker)
    PARSER.timeout_s = float(timeout_s)
    root = Path(__file__).resolve().parents[1]
    settings = CloudSettings(broker=None, dev=True, token="test-token-0123456789abcdef",
                             db=f"sqlite:///{folder}/db.sqlite", models=root / "models",
                             recordings=Path(folder) / "rec", jobs_dir=Path(folder) / "jobs")
    uvicorn.run(create_app(settings), host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":  # the parser's spawned worker imports this module again
    main()
