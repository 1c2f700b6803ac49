// Package kafka is the Kafka adapter of exactly, built on franz-go
// (github.com/twmb/franz-go).
//
// # Publisher
//
// [Publisher] implements exactly.Publisher: idempotent producer, acks=all,
// Key -> partition. Each message becomes a record with the message's Key as
// record key (so the default partitioner, murmur2 like the Java client, sends
// a key to one partition, where it keeps its order), the Payload as value,
// and the message's headers plus exactly-id and exactly-created-at as record
// headers. Publish produces the whole batch asynchronously and returns when
// every record is acknowledged by all in-sync replicas, or with a
// *exactly.BatchError naming the failed messages by index.
//
//	pub, err := kafka.NewClientPublisher([]string{"localhost:9092"})
//	if err != nil { ... }
//	defer pub.Close()
//	err = pub.Publish(ctx, msgs)
//
// # What the idempotent producer covers
//
// Within one producer session (one *kgo.Client), the broker deduplicates
// franz-go's own retries by producer ID and sequence number: a request that
// timed out after the broker wrote it, or whose connection dropped, is retried
// without creating a second copy and without reordering a partition. franz-go
// retries retriable errors (leader changes, not enough replicas, timeouts)
// without limit, so a broker that refuses writes for a while delays Publish
// rather than failing it. When franz-go does give up on a record
// (kgo.RecordRetries, kgo.RecordDeliveryTimeout, a topic that stays unknown,
// a closed client), it fails every record buffered after it in the partition
// too, so a key has no gap: for each key the confirmed messages of a call are
// a prefix of its messages in that call.
//
// The context of Publish bounds the wait, not the records. When it ends,
// Publish returns at once and reports the unanswered messages as "outcome
// unknown"; the client keeps delivering them, in order, in the background
// until the broker takes them or Close. Cancelling them instead would fail
// every record buffered behind them in their partitions, including those of
// concurrent Publish calls, and could fail an earlier message of a key while
// a later one is stored.
//
// # What it does not cover
//
// The sequence numbers belong to the session. When the relay crashes after
// the broker confirmed a batch but before the relay marked it sent, or when
// Publish returns an "outcome unknown" error because its context ended, the
// relay publishes the same messages again, from a new session or as new
// records, and Kafka stores them twice. Both copies carry the same exactly-id
// header; the inbox on the consuming side applies the effect once. Kafka has
// no native dedup by message ID, so the publisher conformance suite runs
// with NativeDedup off.
//
// # Messages the broker cannot take
//
// A message that fails Message.Validate, has no ID, or names an illegal
// topic is refused before it is produced. A record larger than
// kgo.ProducerBatchMaxBytes is refused by the client with
// kerr.MESSAGE_TOO_LARGE, alone; keep that option at or below the topics'
// max.message.bytes, as the defaults are. A broker that refuses a record as
// too large or invalid (kerr.MessageTooLarge, kerr.RecordListTooLarge,
// kerr.InvalidRecord, kerr.InvalidTopicException) refuses its whole batch;
// Publish re-sends the refused records one at a time to find the culprits.
// All of these come back matching exactly.ErrUnpublishable, which tells the
// relay to park the message with the reason instead of retrying it. A topic
// that does not exist is not unpublishable: it fails after
// kgo.UnknownTopicRetries metadata attempts (default 4) and is retried.
package kafka
