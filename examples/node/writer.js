// Places orders: each order row and its event are written in one
// transaction, the event with a plain INSERT into exactly's outbox table.
// `exactly relay` publishes every committed event, once, in order per
// customer; a rolled-back order leaves no event.
//
// Needs the `pg` package (npm install pg):
//
//	node writer.js --dsn postgres://postgres@127.0.0.1/test --count 10 --decline-every 4
'use strict';
const crypto = require('crypto');
const { Client } = require('pg');

// A table name, schema-qualified or not, quoted.
function table(name) {
  return name.split('.').map((p) => '"' + p.replace(/"/g, '""') + '"').join('.');
}

class Declined extends Error {}

// Writes the order and its event in one transaction; on decline it is
// rolled back after both writes: neither is kept.
async function placeOrder(client, outbox, orders, topic, orderId, customer, amount, writer, n, decline) {
  await client.query('BEGIN');
  try {
    await client.query(`INSERT INTO ${table(orders)} (id, customer, amount, writer, n) VALUES ($1, $2, $3, $4, $5)`,
      [orderId, customer, amount, writer, n]);
    const event = { order_id: orderId, customer, amount, writer, n };
    // The outbox row: topic, key and payload (a Buffer, for bytea) are all it
    // needs; id, key_hash and created_at are filled by the database. headers,
    // when given, is a JSON object of strings.
    await client.query(`INSERT INTO ${table(outbox)} (topic, msg_key, payload, headers) VALUES ($1, $2, $3, $4)`,
      [topic, customer, Buffer.from(JSON.stringify(event)),
        JSON.stringify({ 'content-type': 'application/json', writer })]);
    if (decline) throw new Declined(orderId);
    await client.query('COMMIT');
    return true;
  } catch (e) {
    await client.query('ROLLBACK');
    if (e instanceof Declined) return false;
    throw e;
  }
}

async function main() {
  const a = { '--outbox': 'exactly_outbox', '--orders': 'orders', '--topic': 'orders.created', '--writer': 'node', '--customers': 'alice,bob,carol',
    '--count': '10', '--decline-every': '0' };
  const argv = process.argv.slice(2);
  for (let i = 0; i + 1 < argv.length; i += 2) a[argv[i]] = argv[i + 1];
  if (!a['--dsn']) {
    console.error('usage: node writer.js --dsn URL [--outbox T] [--orders T] [--topic T] [--writer NAME] [--customers a,b] [--count N] [--decline-every N]');
    process.exit(2);
  }
  const client = new Client({ connectionString: a['--dsn'] });
  await client.connect();
  await client.query(`CREATE TABLE IF NOT EXISTS ${table(a['--orders'])} (id text PRIMARY KEY, customer text NOT NULL, ` +
    'amount integer NOT NULL, writer text NOT NULL, n integer NOT NULL)');
  const customers = a['--customers'].split(',');
  const count = Number(a['--count']);
  const every = Number(a['--decline-every']);
  for (let n = 0; n < count; n++) {
    const orderId = crypto.randomUUID();
    const decline = every > 0 && n % every === every - 1;
    const ok = await placeOrder(client, a['--outbox'], a['--orders'], a['--topic'], orderId, customers[n % customers.length],
      100 + n, a['--writer'], n, decline);
    process.stdout.write((ok ? 'committed ' : 'rolled back ') + orderId + '\n');
  }
  await client.end();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
