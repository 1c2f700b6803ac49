package kafka

import "github.com/twmb/franz-go/pkg/kgo"

// LeaveGroup makes c's client leave its group while its handlers may still
// be running: the way a member becomes a zombie (kicked out after a pause,
// still holding records).
func LeaveGroup(c *Consumer) { c.cl.LeaveGroup() }

// SetAfterHandle installs a hook that runs after a record's effect committed
// and before its offset is committed to Kafka: the crash window.
func SetAfterHandle(c *Consumer, fn func(topic string, partition int32, offset int64)) {
	c.afterHandle = func(r *kgo.Record) { fn(r.Topic, r.Partition, r.Offset) }
}
