package sqs_test

import (
	"sync"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/sqs"
)

func TestPublisherSuite(t *testing.T) {
	for _, fifo := range []bool{false, true} {
		name := "Standard"
		if fifo {
			name = "FIFO"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := sqstest.NewSQSQueues(t)
			var urls sync.Map // topic -> queue URL
			exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
				New: func(t *testing.T) (exactly.Publisher, string) {
					topic := sqstest.QueueName(fifo)
					url := e.CreateQueue(t, topic, nil)
					urls.Store(topic, url)
					p, err := sqs.NewPublisher(e.Client, sqs.PublisherConfig{})
					if err != nil {
						t.Fatal(err)
					}
					return p, topic
				},
				Read: func(t *testing.T, topic string, n int, timeout time.Duration) []exactlytest.Received {
					url, _ := urls.Load(topic)
					return e.Read(t, url.(string), n, timeout)
				},
				MaxMessageSize: sqs.DefaultMaxMessageSize,
				NativeDedup:    fifo,
				// fauxqs hands out one message per FIFO group per receive,
				// and a receive cut off under the race detector hides its
				// messages for the reader's visibility timeout (1s).
				Settle: 3 * time.Second,
			})
		})
	}
}
