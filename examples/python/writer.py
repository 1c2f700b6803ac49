#!/usr/bin/python3
"""Places orders: each order row and its event are written in one
transaction, the event with a plain INSERT into exactly's outbox table.
`exactly relay` publishes every committed event, once, in order per
customer; a rolled-back order leaves no event.

Needs Debian's python3-psycopg2 (apt-get install python3-psycopg2).

    /usr/bin/python3 writer.py --dsn postgres://postgres@127.0.0.1/test \
        --count 10 --customers alice,bob --decline-every 4
"""
import argparse
import json
import sys
import uuid

import psycopg2
from psycopg2 import sql


def table(name):
    """A table name, schema-qualified or not, as an SQL identifier."""
    return sql.Identifier(*name.split("."))


class Declined(Exception):
    pass


def place_order(conn, outbox, orders, topic, order_id, customer, amount, writer, n, decline=False):
    """Writes the order and its event in one transaction. On `decline` the
    transaction is rolled back after both writes: neither is kept."""
    event = {"order_id": order_id, "customer": customer, "amount": amount, "writer": writer, "n": n}
    try:
        with conn:  # commits at the end of the block, rolls back on an exception
            with conn.cursor() as cur:
                cur.execute(sql.SQL("INSERT INTO {} (id, customer, amount, writer, n) VALUES (%s, %s, %s, %s, %s)")
                            .format(table(orders)), (order_id, customer, amount, writer, n))
                # The outbox row: topic, key and payload (bytes) are all it
                # needs; id, key_hash and created_at are filled by the
                # database. headers, when given, is a JSON object of strings.
                cur.execute(sql.SQL("INSERT INTO {} (topic, msg_key, payload, headers) VALUES (%s, %s, %s, %s)")
                            .format(table(outbox)),
                            (topic, customer, json.dumps(event).encode(),
                             json.dumps({"content-type": "application/json", "writer": writer})))
                if decline:
                    raise Declined(order_id)
    except Declined:
        return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--outbox", default="exactly_outbox")
    p.add_argument("--orders", default="orders")
    p.add_argument("--topic", default="orders.created")
    p.add_argument("--writer", default="python")
    p.add_argument("--customers", default="alice,bob,carol")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--decline-every", type=int, default=0, help="roll back every Nth order (0: none)")
    args = p.parse_args()

    conn = psycopg2.connect(args.dsn)
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, customer text NOT NULL, "
                            "amount integer NOT NULL, writer text NOT NULL, n integer NOT NULL)").format(table(args.orders)))
    customers = args.customers.split(",")
    for n in range(args.count):
        order_id = str(uuid.uuid4())
        decline = args.decline_every > 0 and n % args.decline_every == args.decline_every - 1
        ok = place_order(conn, args.outbox, args.orders, args.topic, order_id, customers[n % len(customers)], 100 + n, args.writer, n, decline)
        print(("committed" if ok else "rolled back"), order_id, flush=True)
    conn.close()


if __name__ == "__main__":
    sys.exit(main())
