"""Generated impressions with behaviour histories of known structure (``synthetic: {kind: sequences}``).

Items belong to topics (item id modulo ``TOPICS``). Each user clicks mostly within two topics and
buys mostly within a third, and every row carries the user's last ``history`` clicks and
purchases before the impression (oldest first, as a list per row). The candidate item is drawn
at random; the labels follow the histories:

- ``click``: P = sigmoid(6 · (share of the recent clicks in the candidate's topic) − 2.5);
- ``buy``: P = sigmoid(6 · (share of the recent purchases in the candidate's topic) − 3), or with
  ``buy_from: clicks`` of the recent clicks (a control: both tasks read the same history).

So each task is driven by a different history: a model that reads the click history
predicts ``click``, the purchase history ``buy``, and a model without histories can only learn
each user's taste from the user id (few rows per user). Columns: ``user``, ``item``,
``topic``, ``clicks`` and ``buys`` (lists of item ids as text), ``click_topics`` and
``buy_topics`` (the topics of those items, as DIN pairs item and category histories), ``click``,
``buy``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mtlcli.recipe.schema import SyntheticSource

TOPICS = 20
IN_TASTE = 0.8  # share of a user's events inside their topics


def generate_sequences(spec: SyntheticSource) -> pl.DataFrame:
    rng = np.random.default_rng(spec.seed)
    n, users, items, length = spec.rows, spec.users, spec.items, spec.history
    click_topics = rng.integers(0, TOPICS, (users, 2))
    buy_topic = rng.integers(0, TOPICS, users)
    user = rng.integers(0, users, n)

    def history(topics: np.ndarray) -> np.ndarray:
        """[n, length] item ids: in one of ``topics`` [n, k] with probability IN_TASTE."""
        inside = rng.random((n, length)) < IN_TASTE
        chosen = topics[np.arange(n)[:, None], rng.integers(0, topics.shape[1], (n, length))]
        topic = np.where(inside, chosen, rng.integers(0, TOPICS, (n, length)))
        return topic + TOPICS * rng.integers(0, items // TOPICS, (n, length))

    clicks = history(click_topics[user])
    buys = history(buy_topic[user][:, None])[:, : max(1, length // 3)]
    item = rng.integers(0, (items // TOPICS) * TOPICS, n)
    topic = item % TOPICS
    click_share = (clicks % TOPICS == topic[:, None]).mean(1)
    buy_share = ((clicks if spec.buy_from == "clicks" else buys) % TOPICS == topic[:, None]).mean(1)
    click = rng.random(n) < 1 / (1 + np.exp(-(6 * click_share - 2.5)))
    buy = rng.random(n) < 1 / (1 + np.exp(-(6 * buy_share - 3)))

    def lists(ids: np.ndarray) -> pl.Series:
        return pl.Series(ids.reshape(-1)).cast(pl.String).reshape(ids.shape).cast(pl.List(pl.String))

    return pl.DataFrame(
        {
            "user": pl.Series(user).cast(pl.String),
            "item": pl.Series(item).cast(pl.String),
            "topic": pl.Series(topic).cast(pl.String),
            "clicks": lists(clicks),
            "click_topics": lists(clicks % TOPICS),
            "buys": lists(buys),
            "buy_topics": lists(buys % TOPICS),
            "click": click.astype(np.int8),
            "buy": buy.astype(np.int8),
        }
    )
