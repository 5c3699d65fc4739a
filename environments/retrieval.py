"""BM25 retrieval over a company's knowledge base (what `search_kb` really runs)."""

from __future__ import annotations

from dataclasses import dataclass

import bm25s
import numpy as np

TOP_K = 3


@dataclass(frozen=True)
class Hit:
    article_id: str
    title: str
    body: str
    score: float


class KBIndex:
    """BM25 over each article's title + body; English stopwords removed, lowercase."""

    def __init__(self, articles):
        self._articles = list(articles)
        corpus = [f"{a.title}\n{a.body}" for a in self._articles]
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int = TOP_K) -> list[Hit]:
        """The top `k` articles with a positive score, best first (fewer when few match)."""
        # get_scores on plain tokens: `retrieve` would start a thread pool on every call.
        (tokens,) = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)
        known = [t for t in tokens if t in self._bm25.vocab_dict]
        if not known:
            return []
        scores_N = self._bm25.get_scores(known)
        top = np.argsort(-scores_N, kind="stable")[:k]
        return [Hit(self._articles[i].id, self._articles[i].title, self._articles[i].body, float(scores_N[i])) for i in top if scores_N[i] > 0]
