package pubsub

import (
	"strings"
	"testing"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"google.golang.org/protobuf/proto"
)

// messageSize counts what proto.Size counts, for the messages Publish
// checks against MaxRequestBytes.
func TestMessageSizeIsProtoSize(t *testing.T) {
	for _, m := range []*gpubsub.Message{
		{},
		{Data: []byte("x")},
		{OrderingKey: "k"},
		{Attributes: map[string]string{"": ""}},
		{Attributes: map[string]string{"exactly-id": "01a2", "empty": ""}, OrderingKey: "order-1", Data: []byte(strings.Repeat("d", 300))},
		{Data: []byte(strings.Repeat("d", 1<<20)), Attributes: map[string]string{strings.Repeat("k", 256): strings.Repeat("v", 1024)}, OrderingKey: strings.Repeat("o", 1024)},
	} {
		want := proto.Size(&pb.PubsubMessage{Data: m.Data, Attributes: m.Attributes, OrderingKey: m.OrderingKey})
		if got := messageSize(m); got != want {
			t.Errorf("messageSize = %d, proto.Size = %d, for data %d bytes, %d attributes, key %d bytes", got, want, len(m.Data), len(m.Attributes), len(m.OrderingKey))
		}
	}
}
