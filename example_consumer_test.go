package exactly_test

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/exactlyonce/exactly"
)

// The shared part of every consumer's configuration: the zero values take
// the defaults, and a bad field is named.
func ExampleConsumerConfig_WithDefaults() {
	cfg, err := exactly.ConsumerConfig{
		Handler: func(ctx context.Context, m *exactly.Message) error { return nil },
	}.WithDefaults()
	fmt.Println(cfg.Workers, cfg.Retry.MaxAttempts, cfg.DeadLetterTopic(&exactly.Message{Topic: "orders"}), err)

	_, err = exactly.ConsumerConfig{}.WithDefaults()
	var bad *exactly.ConfigError
	fmt.Println(errors.As(err, &bad), bad.Field)
	// Output:
	// 1 5 orders.dlq <nil>
	// true Handler
}

// A publish whose confirmation never came is neither a success nor a
// refusal: the message may be on the broker, and publishing it again is
// the safe way on.
func ExampleErrOutcomeUnknown() {
	err := fmt.Errorf("message 42: the connection dropped before its confirm: %w: %w", exactly.ErrOutcomeUnknown, io.ErrUnexpectedEOF)
	fmt.Println(errors.Is(err, exactly.ErrOutcomeUnknown), errors.Is(err, exactly.ErrUnpublishable))
	// Output: true false
}
