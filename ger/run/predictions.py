"""predictions.csv: ger's per-sample prediction format, shared by model runs and the GPT-4V import."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ger.files import atomic_write_text
from ger.records import STATUSES, Prediction

COLUMNS = ["name", "gt", "prediction", "top1", "status", "response_key", "detail", "probs"]


PARTIAL = "predictions.partial.csv"  # the rows so far of a run still going (or killed)


def _row(p: Prediction) -> list[str]:
    ranked = ",".join(r.replace(",", ";") for r in p.ranked)  # commas separate labels
    probs = json.dumps(p.probs, ensure_ascii=False) if p.probs is not None else ""
    return [p.name, p.gt, ranked, p.top1, p.status, p.response_key, p.detail, probs]


def write_predictions(path: Path, preds: list[Prediction]) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a half-written file."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for p in preds:
        writer.writerow(_row(p))
    atomic_write_text(path, buf.getvalue())


class PartialPredictions:
    """predictions.partial.csv: each answered sample's row as soon as it is parsed, in answer order.

    A run in progress (or killed) shows its predictions so far under a name that says they are not
    the run's result; every row goes out in one write, so after a kill -9 the file holds whole rows
    (read_predictions reads it; a torn last row, from a full disk, is reported as truncated). The run
    ends by writing predictions.csv atomically, in label-file order, and then removing this file.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / PARTIAL
        self._file = self.path.open("w", newline="", encoding="utf-8")
        self._rows = [COLUMNS]  # the header goes out with the first add()
        self.added = 0
        self.add([])

    def add(self, preds: list[Prediction]) -> None:
        buf = io.StringIO()
        csv.writer(buf).writerows(self._rows + [_row(p) for p in preds])
        self._rows = []
        self._file.write(buf.getvalue())
        self._file.flush()
        self.added += len(preds)

    def close(self, remove: bool) -> None:
        """Close; remove the file once predictions.csv holds the run's result (or when it holds no row)."""
        self._file.close()  # closing twice is fine
        if remove or not self.added:
            self.path.unlink(missing_ok=True)


def read_predictions(path: Path) -> list[Prediction]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS[:5]) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a ger predictions file (missing columns {sorted(missing)})")
        rows = []
        for row in reader:  # a cut or edited file: too few or too many fields, or a partial status
            if None in row.values() or None in row or row["status"] not in STATUSES:
                raise ValueError(
                    f"{path}:{reader.line_num}: incomplete row (status {row['status']!r}); "
                    "truncated? rerun or restore the file"
                )
            rows.append(row)
        return [
            Prediction(
                name=row["name"],
                gt=row["gt"],
                ranked=[x for x in row["prediction"].split(",") if x] if row["prediction"] else [],
                status=row["status"],
                response_key=row.get("response_key") or "",
                detail=row.get("detail") or "",
                probs=json.loads(row["probs"]) if row.get("probs") else None,
            )
            for row in rows
        ]
