"""``GET /v1/recommendations`` against ``GET /healthz``, on a real uvicorn server.

Baseline (measured in the same run, through the same server and client): ``/healthz``, which
reads nothing, so the ratio shows what answering from the precomputed tables costs on top of
HTTP, auth and JSON. Measured: ``?product_id=`` (one product, and a cart of three) and
``?customer_id=`` (a customer with orders), each after one refresh of a generated history:
``--products`` products, ``--orders`` orders of 1 to 4 products, where each product is most
often bought with its two neighbours (seeded, so every run has the same history). The
refresh's own time is printed too (it runs on the schedule, not per request).

Prints ratios to the baseline, never verdicts: the machines are shared and noisy; each figure
is the median of ``--requests`` sequential requests. ``--database-url`` runs it on
PostgreSQL (an empty, migrated database) instead of a temporary SQLite file.

    .venv/bin/python bench/recommendations.py [--products 2000] [--orders 50000] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from activities.recommendations import refresh_now  # noqa: E402
from kaeru.db import migrate, session  # noqa: E402
from kaeru.models import Order, OrderLine, Product  # noqa: E402
from kaeru.settings import Settings  # noqa: E402
from starter.app import create_app  # noqa: E402

READ_KEY = "bench-read-key"


def write_history(url: str, products: int, orders: int) -> None:
    """Seeded orders: a product's neighbours are its likeliest companions."""
    rng = random.Random(17)
    with session(url) as s:
        for n in range(products):
            s.add(Product(product_id=f"p{n}", name=f"Product {n}", price_minor=1000))
        for n in range(orders):
            first = rng.randrange(products)
            basket = {first}
            while len(basket) < rng.randint(1, 4):
                near = rng.random() < 0.7
                basket.add(
                    (first + rng.choice((-1, 1))) % products if near else rng.randrange(products)
                )
            s.add(
                Order(
                    order_id=f"o{n}",
                    customer_id=f"c{n % (orders // 5 or 1)}",
                    total_minor=0,
                    currency="USD",
                )
            )
            for product in basket:
                s.add(OrderLine(order_id=f"o{n}", product_id=f"p{product}"))


def serve(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, int]:
    config = uvicorn.Config(
        create_app(settings, run_router=False), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def median_ms(client: httpx.Client, path: str, requests: int) -> float:
    took = []
    for _ in range(requests):
        started = time.perf_counter()
        answer = client.get(path)
        took.append(time.perf_counter() - started)
        answer.raise_for_status()
    return statistics.median(took) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--orders", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        migrate(url)
        settings = Settings(_env_file=None, database_url=url, read_key=READ_KEY)
        print(f"writing {args.orders} orders of {args.products} products ...", flush=True)
        write_history(url, args.products, args.orders)
        started = time.perf_counter()
        done = refresh_now(settings)
        print(
            f"refresh: {time.perf_counter() - started:.2f} s for {done.orders} orders, "
            f"{done.pairs} pairs stored",
            flush=True,
        )
        server, thread, port = serve(settings)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=(READ_KEY, "")) as client:
                paths = {
                    "/healthz (baseline)": "/healthz",
                    "?product_id= (one)": "/v1/recommendations?product_id=p42",
                    "?product_id= (cart of 3)": "/v1/recommendations?"
                    + "&".join(f"product_id=p{n}" for n in (1, 500, 900)),
                    "?customer_id=": "/v1/recommendations?customer_id=c7",
                }
                for path in paths.values():  # warm up: connections, compiled statements
                    median_ms(client, path, 20)
                base = median_ms(client, "/healthz", args.requests)
                for label, path in paths.items():
                    took = base if path == "/healthz" else median_ms(client, path, args.requests)
                    print(f"{label:26} {took:6.2f} ms (median), {took / base:4.1f}x the baseline")
        finally:
            server.should_exit = True
            thread.join()


if __name__ == "__main__":
    main()
