// Package amqp is the RabbitMQ (AMQP 0-9-1) adapter of exactly, built on
// github.com/rabbitmq/amqp091-go.
//
// # Publisher
//
// [Publisher] implements exactly.Publisher with publisher confirms. Each
// message is published to one exchange (the [Exchange] option; by default
// the default exchange, which routes to the queue named by the routing
// key) with the routing key Message.Topic (or what [RoutingKeyFunc] makes of
// it), and carries:
//
//   - the AMQP message-id property: Message.ID;
//   - exactly-id: Message.ID again, which is what the inbox deduplicates on;
//   - exactly-key: Message.Key, as AMQP messages have no key of their own;
//   - exactly-created-at: Message.CreatedAt (also in the AMQP timestamp,
//     which keeps whole seconds only);
//   - the message's own headers, as strings;
//   - delivery mode persistent, and the mandatory flag.
//
// Publish returns when the broker has confirmed or refused every message,
// with a *exactly.BatchError naming the failed ones by index. A confirm
// (basic.ack) means the broker took the message and, for a durable queue,
// wrote it to disk; with a quorum queue, a majority of its replicas did.
// Persistent messages in a non-durable queue are lost if the broker
// restarts: declare the queues you rely on durable (or quorum).
//
// # Failures
//
// A message is refused as exactly.ErrUnpublishable, before anything is
// sent, when no retry can help: it is invalid (no ID, no topic), its routing
// key or a header name exceeds AMQP's 255 bytes, or its payload exceeds
// [MaxMessageSize] (16 MiB by default; AMQP does not advertise the broker's
// max_message_size, 128 MiB by default in RabbitMQ). If the broker's limit
// is lower than the option, the broker closes the channel on the first
// larger message; the Publisher then reports that message unpublishable,
// the rest of the batch retryable, and applies the broker's limit from then
// on.
//
// Everything else is retryable, notably:
//
//   - [ErrUnroutable]: the broker returned the message (basic.return)
//     because no queue is bound for its routing key. This is a deliberate
//     choice: the queue may be declared after the relay first tries (a
//     consumer deploys after the producer), so the relay keeps retrying, and
//     parks the message after its last attempt with this reason. The message
//     is never acknowledged as published while nothing holds it. An exchange
//     with an alternate-exchange routes such messages there instead, and
//     they count as confirmed.
//   - [ErrNacked]: the broker refused the message (a queue with
//     x-overflow=reject-publish is full).
//   - a missing exchange: the broker closes the channel, the batch fails.
//   - outcome unknown: the connection or channel closed, or the context
//     ended, before the confirm came. The message may be stored or not.
//
// RabbitMQ does not deduplicate, so a message published again after an
// ambiguous outcome may be stored twice: both copies carry the same
// message-id and exactly-id, and the inbox applies it once. The publisher
// conformance suite runs with NativeDedup off.
//
// # Order and concurrency
//
// The messages of one Publish call are sent on one channel, in slice order,
// and RabbitMQ keeps a channel's order in each queue, so a key keeps its
// order when nothing fails. When a message fails, later messages of its key
// may be confirmed, and the relay's retry lands after them. Concurrent calls
// use different channels (see [Channels]) and are not ordered with each
// other.
//
// # Consumer
//
// [NewConsumer] takes the broker URL and a [ConsumerConfig], the shape
// every consumer of this module has: the shared settings of
// exactly.ConsumerConfig (Handler, Retry, DeadLetter, DeadLetterTopic,
// Workers, Hooks, Logger, Tracer) embedded beside RabbitMQ's own (Queue,
// Prefetch, DeadLetterQueue, the reconnect backoff, DialConfig). It takes a
// URL rather than a connection because it dials, and redials after a lost
// connection, by itself.
//
// [Consumer] consumes one queue with manual acknowledgements and a prefetch
// (64 by default), and runs the Handler per delivery through the policy all
// consumers of this module share: a panic is recovered as a failure; a
// failure is retried with backoff (Retry); after the last attempt the
// message is published, with exactly-dead-reason, exactly-dead-attempts,
// exactly-dead-topic and exactly-dead-at, to a dead-letter queue the
// Consumer declares ("<queue>.dlq", or DeadLetterQueue) or to any
// exactly.Publisher (DeadLetter).
//
// A delivery is acknowledged only after its handler returned nil or after
// the dead-letter destination confirmed it. When Run's context ends, the
// handler's context ends too; a delivery whose handler then gives up is
// rejected with requeue, and the broker delivers it again. Nothing is
// dropped: a dead-letter destination that refuses the message holds the
// delivery (retrying the dead-letter publish) until it accepts or Run ends.
//
// A delivery is decoded as: Message.ID from the AMQP message-id, or the
// exactly-id header when that is empty; Key from exactly-key; CreatedAt
// from exactly-created-at, or the AMQP timestamp; Topic from the routing key
// the message was published with; Headers from the other headers, rendered
// as text. A delivery with no id at all never reaches the handler, which
// could not be deduplicated: RabbitMQ gives a message no position that
// survives a redelivery, so, by the rule of exactly.ErrNoID, it is
// dead-lettered at once with [ErrNoID] as its reason, under a stand-in id
// ("amqp-noid-" and a hash of its content) so that it can be found and
// redelivered copies recognised. [DeliveryInfoFrom] gives the handler the
// delivery's details, among them the broker's Redelivered flag.
//
// [Consumer.Stats] and the Hooks report what the Consumer does: deliveries
// received, handled, failed attempts, dead letters, acknowledgements that
// could not be sent and redeliveries (exactly.ConsumerStats, as every
// consumer counts them), and reconnects.
//
// Workers (1 by default) sets how many deliveries are handled at once.
// With one, they are handled in queue order, and a message being retried
// holds back the ones after it. With more, they are spread over the workers
// by Message.Key, so each key's messages are still handled one at a time in
// queue order (per-key workers, as on NATS); deliveries without a key go to
// the workers in turn. Several Consumers of one queue share its messages
// and so lose per-key order between them: run one per queue where order
// matters.
//
// The Consumer passes exactlytest.RunConsumerSuite with the SQL inbox: in
// the suite's terms, per-key order with any Workers (OrderPerKey), no ack
// deadline to keep alive (RabbitMQ takes nothing back from a live channel),
// and id-less messages dead-lettered (NoIDDeadLettered).
//
// # Guarantees and limits
//
// Delivery is at least once. After a lost connection (a network failure, a
// broker restart, a crash of the consumer between the effect and the ack,
// an ack lost on the way) RabbitMQ redelivers every unacknowledged delivery,
// flagged as redelivered, possibly to another consumer; Run reconnects by
// itself, with backoff (ReconnectBackoff), and carries on. A handler
// therefore runs more than once for the same Message.ID: wrap it with the
// inbox to apply its effect once per ID.
//
// Run returns an error, instead of reconnecting, when the broker refuses
// the set-up: the queue does not exist, access is refused, or the
// dead-letter queue exists with other arguments.
//
// RabbitMQ closes a channel whose delivery stays unacknowledged longer than
// its consumer_timeout (30 minutes by default), which redelivers the
// message: keep the handler's time plus its retries well below it.
// Retry attempts are counted per delivery; a delivery that comes back
// (after a reconnect or a requeue) starts again at attempt one. A message
// that crashes the whole process every time is therefore never
// dead-lettered by the Consumer: use a quorum queue with a delivery-limit
// for that. A classic queue puts a requeued message back in its place;
// other queue types may not.
//
// Both the Publisher and the Consumer own their connections (one each: the
// Consumer's default dead-letter publisher has its own, as RabbitMQ advises
// keeping publishing and consuming apart). amqp091-go's own experimental
// recovery must stay off (see [DialConfig] and ConsumerConfig.DialConfig).
package amqp
