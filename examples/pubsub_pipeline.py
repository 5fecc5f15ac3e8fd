"""A pub/sub pipeline: orders published on one host, enriched by an agent on another, and
collected by a subscriber on a third — all through topics, no host names anywhere.

    orders.<region>.created ──▶ enricher agent ──▶ orders.<region>.priced ──▶ sink

    python examples/pubsub_pipeline.py enricher --socket A.sock
    python examples/pubsub_pipeline.py sink --socket B.sock
    python examples/pubsub_pipeline.py produce 10 --socket C.sock
"""

from __future__ import annotations

import argparse

import anyio

from meshd_client import Mesh

PRICES = {"apple": 3, "pear": 4, "plum": 2}


async def enricher(mesh: Mesh) -> None:
    """Subscribes to every region's new orders, prices them and publishes the result."""
    async with mesh.subscribe("orders.*.created") as orders:
        print("enricher: waiting for orders.*.created", flush=True)
        async for signal in orders:
            order = dict(signal.data)
            order["total"] = PRICES.get(order["item"], 1) * order["qty"]
            region = signal.topic.split(".")[1]
            await mesh.publish(
                f"orders.{region}.priced",
                order,
                subject=signal.subject,
                source="meshd-example://enricher",
            )


async def sink(mesh: Mesh, count: int) -> None:
    async with mesh.subscribe("orders.**") as events:
        print("sink: listening on orders.**", flush=True)
        seen = 0
        async for signal in events:
            if signal.topic.endswith(".priced"):
                print(f"sink: {signal.subject} {signal.data}", flush=True)
                seen += 1
                if count and seen >= count:
                    return


async def produce(mesh: Mesh, count: int) -> None:
    items = list(PRICES)
    for i in range(count):
        region = ("eu", "us")[i % 2]
        order = {"id": i, "item": items[i % len(items)], "qty": i % 5 + 1}
        hosts = await mesh.publish(f"orders.{region}.created", order, subject=f"order-{i}")
        print(f"produced order {i} (to {hosts} host(s))", flush=True)
        await anyio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    async with Mesh.connect(args.socket) as mesh:
        if args.role == "enricher":
            await enricher(mesh)
        elif args.role == "sink":
            await sink(mesh, args.count)
        else:
            await produce(mesh, args.count or 10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=("enricher", "sink", "produce"))
    parser.add_argument("count", nargs="?", type=int, default=0)
    parser.add_argument("--socket")
    anyio.run(main, parser.parse_args())
