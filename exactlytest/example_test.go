package exactlytest_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
)

// A lost acknowledgement is the classic source of duplicates: the broker
// stored the batch, the publisher never heard so, and the retry stores it
// again under the same IDs.
func ExampleRecorder_LoseAcks() {
	var broker exactlytest.Recorder
	broker.LoseAcks(1, errors.New("i/o timeout"))

	msgs := []*exactly.Message{
		{ID: "order-1:created", Topic: "orders", Key: "order-1", Payload: []byte(`{}`)},
		{ID: "order-1:paid", Topic: "orders", Key: "order-1", Payload: []byte(`{}`)},
	}
	ctx := context.Background()
	for attempt := 1; ; attempt++ {
		err := broker.Publish(ctx, msgs)
		fmt.Printf("attempt %d: %v\n", attempt, err)
		if err == nil {
			break
		}
	}
	fmt.Println("delivered:", len(broker.Delivered()), "duplicates:", broker.Duplicates())
	// Output:
	// attempt 1: i/o timeout
	// attempt 2: <nil>
	// delivered: 4 duplicates: [order-1:created order-1:paid]
}

// Per-message faults come back as a *exactly.BatchError, by index.
func ExampleRecorder_FailIndex() {
	var broker exactlytest.Recorder
	broker.FailIndex(1, exactly.Unpublishable(errors.New("message too large")))

	msgs := []*exactly.Message{
		{ID: "1", Topic: "t", Payload: []byte("a")},
		{ID: "2", Topic: "t", Payload: []byte("b")},
		{ID: "3", Topic: "t", Payload: []byte("c")},
	}
	err := broker.Publish(context.Background(), msgs)
	for i, e := range exactly.PerMessage(err, len(msgs)) {
		fmt.Printf("%d: confirmed=%v park=%v\n", i, e == nil, errors.Is(e, exactly.ErrUnpublishable))
	}
	// Output:
	// 0: confirmed=true park=false
	// 1: confirmed=false park=true
	// 2: confirmed=true park=false
}
