"""Continual-learning metrics from the accuracy matrix R, with R[i][j] = accuracy on task j's test set after
training task i (0-based, T tasks). Definitions, so numbers can be compared with papers:

- average accuracy (Lopez-Paz & Ranzato 2017): ACC = mean_j R[T-1][j], the final model on every task.
- average incremental accuracy (Rebuffi et al. 2017): the mean over steps i of mean_{j<=i} R[i][j].
- forgetting of task j < T-1 (Chaudhry et al. 2018): max_{l in j..T-2} R[l][j] - R[T-1][j]; average forgetting is
  its mean over those T-1 tasks (undefined for one task).
- backward transfer: BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (negative = forgetting).
- forward transfer: FWT = mean_{j>=1} (R[j-1][j] - b[j]) with b[j] the accuracy of the untrained model (zero-shot)
  on task j: what earlier tasks did for a task before it was trained. Needs b; undefined for one task.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(matrix: Matrix) -> int:
    tasks = len(matrix)
    if tasks == 0 or any(len(row) != tasks for row in matrix):
        raise ValueError(f"the accuracy matrix must be square and non-empty, got rows of {[len(r) for r in matrix]}")
    return tasks


def average_accuracy(matrix: Matrix) -> float:
    tasks = _check(matrix)
    return sum(matrix[-1]) / tasks


def average_incremental_accuracy(matrix: Matrix) -> float:
    tasks = _check(matrix)
    return sum(sum(matrix[i][:i + 1]) / (i + 1) for i in range(tasks)) / tasks


def forgetting_per_task(matrix: Matrix) -> list[float]:
    tasks = _check(matrix)
    return [max(matrix[step][j] for step in range(j, tasks - 1)) - matrix[-1][j] for j in range(tasks - 1)]


def average_forgetting(matrix: Matrix) -> float | None:
    values = forgetting_per_task(matrix)
    return sum(values) / len(values) if values else None


def backward_transfer(matrix: Matrix) -> float | None:
    tasks = _check(matrix)
    if tasks < 2:
        return None
    return sum(matrix[-1][j] - matrix[j][j] for j in range(tasks - 1)) / (tasks - 1)


def forward_transfer(matrix: Matrix, zero_shot: Sequence[float] | None) -> float | None:
    tasks = _check(matrix)
    if tasks < 2 or zero_shot is None:
        return None
    if len(zero_shot) != tasks:
        raise ValueError(f"zero-shot accuracies: expected one per task ({tasks}), got {len(zero_shot)}")
    return sum(matrix[j - 1][j] - zero_shot[j] for j in range(1, tasks)) / (tasks - 1)


def summarise(matrix: Matrix, zero_shot: Sequence[float] | None = None,
              control: Sequence[float] | None = None) -> dict:
    """Every summary of a finished sequence, JSON-ready; `control` is the control-set accuracy after each task."""
    return {
        "average_accuracy": average_accuracy(matrix),
        "average_incremental_accuracy": average_incremental_accuracy(matrix),
        "average_forgetting": average_forgetting(matrix),
        "forgetting_per_task": forgetting_per_task(matrix),
        "backward_transfer": backward_transfer(matrix),
        "forward_transfer": forward_transfer(matrix, zero_shot),
        "accuracy_per_step": [sum(matrix[i][:i + 1]) / (i + 1) for i in range(len(matrix))],
        "final_control_accuracy": control[-1] if control else None,
    }
