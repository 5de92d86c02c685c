"""Influence scoring: lr-weighted cosine between pool and target gradients, aggregated per task.

* :mod:`~qless.scoring.cosine`: the maths on tensors (subtask means, one matmul per block)
* :mod:`~qless.scoring.packed`: the same scores straight from packed low-bit codes (int8 matmuls)
* :mod:`~qless.scoring.driver`: :func:`score` feeds store blocks to them; :class:`Scores`
* :mod:`~qless.scoring.aggregate`: target subtasks, checkpoint weights, max/mean over subtasks
* :mod:`~qless.scoring.folder`: the scores folder on disk
* :mod:`~qless.scoring.reference`: float64 references for tests
"""

from qless.scoring.aggregate import TargetGroups, aggregate, checkpoint_weights, target_groups
from qless.scoring.driver import ScoreConfig, Scores, align_rows, pair_checkpoints, score, subtask_vectors
from qless.scoring.folder import SCORES_FORMAT, read_scores, scores_inputs, write_scores
from qless.scoring.reference import aggregate_reference, influence_reference

__all__ = ["SCORES_FORMAT", "ScoreConfig", "Scores", "TargetGroups", "aggregate", "aggregate_reference", "align_rows",
           "checkpoint_weights", "influence_reference", "pair_checkpoints", "read_scores", "score", "scores_inputs", "subtask_vectors",
           "target_groups", "write_scores"]
