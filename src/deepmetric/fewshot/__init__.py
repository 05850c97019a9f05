"""Few-shot transfer and out-of-distribution protocols.

* :mod:`~deepmetric.fewshot.episodes`: seeded n-way k-shot episodes over any data set's classes.
* :mod:`~deepmetric.fewshot.prototypes`: nearest-prototype / kNN classification, accuracy over episodes
  (mean ± 95% CI).
* :mod:`~deepmetric.fewshot.adapted`: training on the k-shot target data (adapted embeddings, Scott et al.
  2018, with their stopping rule; the ooDML head adaptation, Milbich et al. 2021).
* :mod:`~deepmetric.fewshot.weight_transfer`: a new n-way output layer on a source classifier, fine-tuned.
* :mod:`~deepmetric.fewshot.transfer` (``deepmetric transfer``) and :mod:`~deepmetric.fewshot.ood`
  (``deepmetric ood``): the two protocols, from a :mod:`~deepmetric.fewshot.config` YAML.
"""

from deepmetric.fewshot.episodes import Episode, EpisodeSampler, episode_from_support
from deepmetric.fewshot.prototypes import EpisodeScores, evaluate_episodes, knn_classify, mean_ci95, nearest_prototype

__all__ = ["Episode", "EpisodeSampler", "episode_from_support", "EpisodeScores", "evaluate_episodes",
           "knn_classify", "mean_ci95", "nearest_prototype"]
