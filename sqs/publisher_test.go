package sqs_test

import (
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
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
			e := connect(t)
			urls := map[string]string{} // topic -> queue URL, written before the subtest reads it
			var mu = make(chan struct{}, 1)
			exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
				New: func(t *testing.T) (exactly.Publisher, string) {
					topic := queueName(fifo)
					url := e.createQueue(t, topic, nil)
					mu <- struct{}{}
					urls[topic] = url
					<-mu
					p, err := sqs.NewPublisher(e.client, sqs.PublisherConfig{})
					if err != nil {
						t.Fatal(err)
					}
					return p, topic
				},
				Read: func(t *testing.T, topic string, n int, timeout time.Duration) []exactlytest.Received {
					mu <- struct{}{}
					url := urls[topic]
					<-mu
					return e.readQueue(t, url, n, timeout)
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
