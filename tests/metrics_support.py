"""Scrape a component's /metrics over HTTP, as Prometheus does, and read samples from it."""

from __future__ import annotations

import asyncio
import math
import urllib.request

from prometheus_client import parser


def scrape_sync(url: str, *, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await asyncio.to_thread(scrape_sync, url)


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist yet (a labelled counter never incremented)."""
    got = samples.get((name, tuple(sorted(labels.items()))), 0.0)
    assert not math.isnan(got), f"{name}{labels} is NaN"
    return got
