"""The task suite: named rank-classification tasks over plain text (no model code here).

A Task loads `Example(text, choices, label)` rows per split; the model scores each choice
(a string with a leading space) as a continuation of `text` and predicts the best one.

Data: files under $SPOT_DATA (default <repo root>/../shared/data) are read in place, never
copied; a missing file raises MissingDataError naming its path. Malformed rows are dropped
with a warning giving their count and first line numbers (logger "spot.tasks").

Splits ("train", "validation", "test"), always in file order:
- the files' own train/dev/test where all three exist: sst5 (stsa.fine.train/dev/test), and
  sst2, whose test.tsv is GLUE's 872-row, sentence-level dev set and whose train.tsv and
  dev.tsv are a split of GLUE's train (sentences and their parse-tree phrases): validation is
  dev.tsv's complete sentences (ending in . ! or ?), like the test rows, and its phrases join
  train.
- train + a dev or test file: that file is the test split, and validation is carved from
  train: min(1000, max(1, floor(0.1 * n_train))) rows. Applies to trec and agnews (their
  test files; agnews/train.tsv holds 10,000 articles), cola (in_domain_dev +
  out_of_domain_dev, i.e. GLUE's dev), and rte and cb (val.jsonl, SuperGLUE's dev).
- FewGLUE's boolq, copa, multirc (32 training rows; multirc: 32 passages): all of train
  trains, validation is carved from val.jsonl (SuperGLUE's dev) by the same rule, and the
  rest of val.jsonl is test. MultiRC is carved by passage, then expanded to one row per answer
  option.
- wsc: FewGLUE's 32 training rows all have label 1, so wsc splits val.jsonl (SuperGLUE's dev,
  104 rows) alone: half is test, a fifth of the rest validation, the rest trains (42/10/52).
- one file (mr, subj, mpqa): test is carved first by the same rule, then validation from
  the rest.
- BIG-bench (spot.tasks.bigbench): test = 20% capped at 1000, then validation as above.
"Carved" means: rows ranked by sha256("<task>/<split>/<row index>") and the first k held
out (spot.tasks.splits), so splits are fixed for a given file.

Built-in tasks register on import; `python -m spot.tasks` prints their split sizes.
"""

from spot.tasks import bigbench, sentence, superglue  # noqa: F401  (registers the built-ins)
from spot.tasks.bigbench import ensure_bigbench_archive
from spot.tasks.core import FAMILIES, SPLITS, Example, MissingDataError, Task, TaskError
from spot.tasks.files import data_root
from spot.tasks.metrics import METRICS, accuracy, f1, macro_f1, mcc
from spot.tasks.registry import get_task, list_tasks, register_task
from spot.tasks.user import task_from_file

__all__ = [
    "FAMILIES",
    "METRICS",
    "SPLITS",
    "Example",
    "MissingDataError",
    "Task",
    "TaskError",
    "accuracy",
    "data_root",
    "ensure_bigbench_archive",
    "f1",
    "get_task",
    "list_tasks",
    "macro_f1",
    "mcc",
    "register_task",
    "task_from_file",
]
