#!/usr/bin/python3
"""Ships orders, once per order event however often the event is delivered.

The effect (a shipment row, the customer's total) and the inbox claim are
written in one transaction: the claim is a plain
INSERT ... ON CONFLICT DO NOTHING into exactly's inbox table, keyed by the
consumer's name and the message id (the `exactly-id` header on every
broker; Nats-Msg-Id on NATS). A claim that inserts nothing means the
message was applied before: the effect is skipped and the message acked.
A crash before the commit leaves neither the effect nor the claim, and the
broker delivers the message again.

The broker client is left out so the example needs nothing but
python3-psycopg2: deliveries come on stdin as JSON lines
{"id": ..., "key": ..., "payload": ...} and each line written to stdout,
"ack <id>", is the ack (the point after the commit where a real client
acks). Wire handle() to your broker's client the same way.

    /usr/bin/python3 consumer.py --dsn postgres://postgres@127.0.0.1/test < deliveries.jsonl
"""
import argparse
import json
import sys

import psycopg2
from psycopg2 import sql


def table(name):
    return sql.Identifier(*name.split("."))


# The inbox claim, as exactly's Go inbox writes it (processed_at is the
# database clock in Unix milliseconds; the inbox's pruning reads it).
CLAIM = ("INSERT INTO {} (consumer, id, processed_at) "
         "VALUES (%s, %s, (extract(epoch FROM clock_timestamp()) * 1000)::bigint) "
         "ON CONFLICT (consumer, id) DO NOTHING")


def handle(conn, inbox, consumer, shipments, totals, msg_id, payload):
    """Applies the message's effect once. Returns True when it applied it,
    False when the message was a duplicate."""
    event = json.loads(payload)
    with conn:  # one transaction: the claim and the effect commit together
        with conn.cursor() as cur:
            cur.execute(sql.SQL(CLAIM).format(table(inbox)), (consumer, msg_id))
            if cur.rowcount == 0:
                return False  # applied before: skip the effect, ack
            cur.execute(sql.SQL("INSERT INTO {} (order_id, message_id, customer) VALUES (%s, %s, %s)")
                        .format(table(shipments)), (event["order_id"], msg_id, event["customer"]))
            cur.execute(sql.SQL("INSERT INTO {} AS t (customer, total) VALUES (%s, %s) "
                                "ON CONFLICT (customer) DO UPDATE SET total = t.total + excluded.total")
                        .format(table(totals)), (event["customer"], event["amount"]))
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--inbox", default="exactly_inbox", help="the inbox table (exactly migrate --only inbox)")
    p.add_argument("--consumer", default="shipping", help="this consumer's name in the inbox")
    p.add_argument("--shipments", default="shipments")
    p.add_argument("--totals", default="customer_totals")
    args = p.parse_args()

    conn = psycopg2.connect(args.dsn)
    with conn, conn.cursor() as cur:
        # No unique constraint on order_id: an effect applied twice would show.
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (order_id text NOT NULL, message_id text NOT NULL, "
                            "customer text NOT NULL)").format(table(args.shipments)))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (customer text PRIMARY KEY, total bigint NOT NULL)")
                    .format(table(args.totals)))
    for line in sys.stdin:
        if not line.strip():
            continue
        d = json.loads(line)
        applied = handle(conn, args.inbox, args.consumer, args.shipments, args.totals, d["id"], d["payload"])
        print("ack", d["id"], "applied" if applied else "duplicate", flush=True)
    conn.close()


if __name__ == "__main__":
    sys.exit(main())
