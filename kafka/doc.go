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
// Publish returns at once and reports the unanswered messages as
// exactly.ErrOutcomeUnknown; the client keeps delivering them, in order, in the background
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
//
// # Consumer
//
// [Consumer] consumes topics as a member of a consumer group and runs an
// exactly.Handler for each record, in the shape every consumer of exactly
// has: the shared settings (Handler, Retry, DeadLetter, DeadLetterTopic,
// Workers, Hooks, Logger, Tracer) are exactly.ConsumerConfig, embedded in
// [ConsumerConfig] beside Kafka's own.
//
//	c, err := kafka.NewConsumer(seeds, kafka.ConsumerConfig{
//		ConsumerConfig: exactly.ConsumerConfig{Handler: handle}, // usually wrapped by the inbox
//		Group: "billing", Topics: []string{"orders"},
//	})
//	if err != nil { ... }
//	err = c.Run(ctx) // until ctx ends
//
// It has two modes. [NewConsumer] commits the group's offsets to Kafka
// after the handler returned (commit-after-effect): a crash in between
// redelivers the record, and the inbox absorbs the copy. [NewDBConsumer]
// stores the offsets in the database, in the transaction of the effect
// ([DBConfig].TxHandler), so nothing is applied twice without a dedup
// table. Both handle up to Workers partitions at a time (default 1), the
// records of one partition one at a time in offset order, and retry and
// dead-letter under the policy every consumer shares. A record without an
// exactly-id header gets the id kafka:<topic>/<partition>/<offset>, stable
// across redeliveries, and is handled as any other.
//
// # Exactly-once processing: Processor
//
// [Processor] is consume-transform-produce from Kafka to Kafka with Kafka
// transactions, as Kafka Streams' exactly-once mode does it. It reads the
// input topics as a member of a consumer group (read_committed), calls a
// [ProcessFunc] for each record, and writes the outputs, any dead letters
// and the group's input offsets in one transaction (franz-go's
// GroupTransactSession, KIP-447). Transactions are batched: one commits
// every CommitInterval (default 100ms) or MaxBatchRecords input records,
// because each commit costs a few round trips to the coordinators.
//
//	p, err := kafka.NewProcessor(kafka.ProcessorConfig{
//		Seeds: seeds, Group: "enricher", Topics: []string{"orders"},
//		InstanceID: os.Getenv("POD_NAME"), // stable across restarts, unique while running
//	}, func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
//		return []exactly.Message{{Topic: "orders-enriched", Key: string(rec.Key), Payload: enrich(rec.Value)}}, nil
//	})
//	if err != nil { ... }
//	err = p.Run(ctx)
//
// What is guaranteed, to consumers that read the outputs with
// isolation.level=read_committed (kgo.FetchIsolationLevel(kgo.ReadCommitted())):
//
//   - Each input record's outputs, or its dead letter, become visible
//     exactly once: in the transaction that moves the group's offset past
//     the record, and in no other. Nothing is lost: an offset never advances
//     without the outputs of the records before it.
//   - Order: the records of an input partition are processed in order, and
//     outputs with the same key land on one output partition in that order.
//   - A transaction that cannot commit is aborted and its input is processed
//     again from the group's committed offsets: after a crash, an injected
//     or broker error, a produce failure, or a rebalance, which aborts the
//     open transaction rather than committing half a batch.
//   - Zombies are fenced twice. The transactional ID (TransactionalIDPrefix +
//     "-" + InstanceID) is initialized before each session, which bumps the
//     producer epoch: the previous run of the instance, if it is still alive,
//     can no longer write or commit, and the transaction it left open is
//     aborted at once. And the offsets are committed with the member's group
//     generation (KIP-447), so a member the group has moved on from cannot
//     commit, whatever its transactional ID. A fenced instance's Run returns
//     ErrFenced; it does not try to win the ID back.
//   - A commit whose outcome is unknown is never reported as done. When the
//     EndTxn answer is lost, the processor does not rewind and retry inside
//     the same session (the session's idea of the committed offsets may be
//     stale): it starts a new session with the same transactional ID, which
//     completes or aborts the transaction on the broker, and resumes from the
//     offsets the broker holds. franz-go turns a commit answered with
//     UNKNOWN_SERVER_ERROR into an abort and rewinds; the processor then
//     reads the group's offsets and, when the broker did commit, starts a new
//     session the same way.
//   - A ProcessFunc that fails is retried (Retry, exactly.RetryPolicy); after
//     the last attempt the input goes to the dead-letter topic, in the same
//     transaction as its offset. An output that is invalid, or that the
//     broker refuses as too large, sends its input there too.
//   - Outputs without an ID get one derived from the input's exactly-id and
//     the output's index (a UUIDv5), the same on every replay.
//
// Under which brokers and settings: Kafka 2.5 or later (KIP-447: fencing by
// group generation, and offset fetches that wait for pending transactions;
// franz-go sleeps 500ms after each commit on older brokers and the guarantee
// weakens), including Kafka 4 with transaction.version 2 (KIP-890). The
// broker settings that make a committed transaction durable are the
// production ones: replication factor 3 and min.insync.replicas 2 for the
// output topics and for __transaction_state
// (transaction.state.log.replication.factor, transaction.state.log.min.isr),
// and unclean.leader.election.enable=false. TransactionTimeout must not
// exceed the broker's transaction.max.timeout.ms.
//
// What is not guaranteed:
//
//   - Effects outside Kafka. A ProcessFunc runs at least once per input
//     record (every abort replays it); a database write or an HTTP call made
//     inside it happens again on a replay. Make it idempotent or apply it
//     through the inbox (package inbox), keyed by the input's exactly-id.
//   - read_uncommitted consumers see the records of aborted transactions.
//   - Outputs to another cluster, or produced by another client: only the
//     processor's own transaction is atomic with the offsets.
//   - Input records removed by retention before they were processed.
//   - Liveness around crashes: the offsets of the partitions a crashed
//     instance held stay unstable, and those partitions are not read, until
//     it restarts with the same InstanceID or TransactionTimeout passes. A
//     transaction open longer than TransactionTimeout (a ProcessFunc that
//     hangs, long retries) is aborted by the broker and its batch replayed.
//
// # Exactly-once from the CDC relay: CDCExactlyOnce
//
// [CDCExactlyOnce] is the CDC relay's exactly-once mode (set it as
// pgcdc.Config.ExactlyOnce instead of a Publisher): each batch of the
// replication slot is one transaction holding its records and a checkpoint
// record of the slot's position on a compacted topic (CheckpointTopic,
// default exactly_cdc_checkpoints). At start it fences earlier producers of
// its TransactionalID (default exactly-cdc-<slot>) and reads the last
// committed checkpoint, and the relay skips what is at or below it. What it
// guarantees is in the pgcdc documentation, "Exactly-once to Kafka".
//
// The Publisher above stays idempotent, not transactional: its idempotence
// covers the client's retries within one producer session, not a restarted
// producer; see the sections above.
//
// # Crash loops
//
// A member killed with SIGKILL does not leave its group; the coordinator
// counts it until its session times out, and a rebalance waits for it up
// to the rebalance timeout. A restarted process without an instance id
// joins as one more member, so an orchestrator that restarts a crashing
// consumer every few seconds piles dead members into the group faster
// than they expire. Give every instance a stable InstanceID
// (ConsumerConfig.InstanceID; ProcessorConfig.StaticMembership with its
// InstanceID): it joins as a static member (group.instance.id, KIP-345), a
// restart takes the place and the partitions of its previous run at once,
// and a burst of crashes leaves no dead member behind. Set SessionTimeout
// to cover a restart, RebalanceTimeout to cover one poll's work.
//
// franz-go's in-process broker, kfake (the demo's and the tests' broker),
// wedges such a group outright without static membership: a member killed
// while its JoinGroup is parked is kept by the completed rebalance and,
// when the answer cannot be written to its closed connection, never gets a
// session timer, so it holds the partitions it is given for ever; and a
// live member parked in JoinGroup is expired by its session timer without
// an answer, so it waits out its request timeout and joins again,
// restarting the rebalance (TestKfakeNeverExpiresMemberKilledInJoin,
// TestKfakeExpiresMemberWaitingInJoin). Kafka's coordinator does neither.
//
// Every member watches its group (DescribeGroups, every RebalanceTimeout/10
// and at most 5s apart): one that has held no partition, or whose group has
// not been Stable, for longer than RebalanceTimeout logs a warning with the
// state it sees and sets the Stalled gauge of its Stats (Partitions is the
// other gauge). A member of a group with more members than partitions
// holds none by design and reports it the same way.
package kafka
