package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	awssns "github.com/aws/aws-sdk-go-v2/service/sns"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/smithy-go"

	"github.com/exactlyonce/exactly"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/sns"
	"github.com/exactlyonce/exactly/sqs"
)

// awsFlags are the settings of --broker sqs and --broker sns.
type awsFlags struct {
	region    string
	endpoint  string
	sqsQueues string
	snsTopics string
	snsPrefix string
}

// pairs parses a comma-separated list of topic=value pairs.
func pairs(flag, list string) (map[string]string, error) {
	m := map[string]string{}
	for _, pair := range splitList(list) {
		from, to, ok := strings.Cut(pair, "=")
		from, to = strings.TrimSpace(from), strings.TrimSpace(to)
		if !ok || from == "" || to == "" {
			return nil, fmt.Errorf("--%s: %q is not topic=value", flag, pair)
		}
		if _, dup := m[from]; dup {
			return nil, fmt.Errorf("--%s: topic %q is mapped twice", flag, from)
		}
		m[from] = to
	}
	return m, nil
}

// checkAWS validates the --broker sqs and sns settings.
func (f *relayFlags) checkAWS() error {
	a := &f.aws
	if f.tls.wanted() {
		return fmt.Errorf("--tls, --tls-ca, --tls-cert, --tls-key and --tls-server-name are not for --broker %s: the AWS SDK uses TLS to AWS (an https:// --aws-endpoint)", f.broker)
	}
	if a.endpoint != "" {
		u, err := url.Parse(a.endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("--aws-endpoint: want http://host:port or https://host, got %q", hide.String(a.endpoint))
		}
	}
	switch f.broker {
	case "sqs":
		if a.snsTopics != "" || a.snsPrefix != "" {
			return errors.New("--sns-topics and --sns-arn-prefix are for --broker sns, not sqs")
		}
		_, err := pairs("sqs-queues", a.sqsQueues)
		return err
	default:
		if a.sqsQueues != "" {
			return errors.New("--sqs-queues is for --broker sqs, not sns")
		}
		if a.snsPrefix != "" && !strings.HasPrefix(a.snsPrefix, "arn:") {
			return fmt.Errorf("--sns-arn-prefix %q is not the start of an ARN (arn:aws:sns:REGION:ACCOUNT:)", a.snsPrefix)
		}
		topics, err := pairs("sns-topics", a.snsTopics)
		if err != nil {
			return err
		}
		for topic, arn := range topics {
			if !strings.HasPrefix(arn, "arn:") {
				return fmt.Errorf("--sns-topics: topic %q maps to %q, which is not an ARN", topic, arn)
			}
		}
		return nil
	}
}

// awsConfig loads the SDK configuration: the standard credential chain
// (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the shared
// files, web identity, ECS and EC2 roles), the region of --aws-region or of
// that chain, and --aws-endpoint.
func (f *relayFlags) awsConfig(ctx context.Context) (aws.Config, error) {
	hide.Add(os.Getenv("AWS_SECRET_ACCESS_KEY"), os.Getenv("AWS_SESSION_TOKEN"))
	var opts []func(*config.LoadOptions) error
	if f.aws.region != "" {
		opts = append(opts, config.WithRegion(f.aws.region))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return aws.Config{}, fmt.Errorf("AWS configuration: %s", f.hideSecrets(err.Error()))
	}
	if cfg.Region == "" {
		return aws.Config{}, errors.New("--aws-region is required with --broker " + f.broker + " when neither AWS_REGION nor the shared config names one")
	}
	if f.aws.endpoint != "" {
		cfg.BaseEndpoint = aws.String(f.aws.endpoint)
	}
	return cfg, nil
}

// reached reports whether err still proves that the service answered: a
// publisher's role may lack the permission to list.
func reached(err error) bool {
	var apiErr smithy.APIError
	if err == nil {
		return true
	}
	if errors.As(err, &apiErr) {
		switch apiErr.ErrorCode() {
		case "AccessDenied", "AccessDeniedException", "AuthorizationError":
			return true
		}
	}
	return false
}

// newAWSPublisher builds the SQS or SNS publisher and checks that the
// service answers with the credentials.
func (f *relayFlags) newAWSPublisher(ctx, cctx context.Context, log *slog.Logger) (exactly.Publisher, func(), error) {
	cfg, err := f.awsConfig(ctx)
	if err != nil {
		return nil, nil, err
	}
	where := strings.ToUpper(f.broker) + " in " + cfg.Region
	if f.aws.endpoint != "" {
		where = strings.ToUpper(f.broker) + " at " + hide.String(f.aws.endpoint)
	}
	if f.broker == "sqs" {
		client := awssqs.NewFromConfig(cfg)
		if _, err := client.ListQueues(cctx, &awssqs.ListQueuesInput{MaxResults: aws.Int32(1)}); !reached(err) {
			return nil, nil, fmt.Errorf("cannot reach %s within %s: %s", where, connectTimeout, f.hideSecrets(err.Error()))
		}
		queues, _ := pairs("sqs-queues", f.aws.sqsQueues)
		pc := sqs.PublisherConfig{QueueURLs: map[string]string{}}
		names := map[string]string{}
		for topic, q := range queues {
			if strings.Contains(q, "://") {
				pc.QueueURLs[topic] = q
			} else {
				names[topic] = q
			}
		}
		pc.QueueName = func(topic string) string {
			if n, ok := names[topic]; ok {
				return n
			}
			return topic
		}
		p, err := sqs.NewPublisher(client, pc)
		if err != nil {
			return nil, nil, err
		}
		log.Info("publishing to SQS", "region", cfg.Region, "endpoint", hide.String(f.aws.endpoint), "mapped_topics", len(queues))
		return p, func() {}, nil
	}
	client := awssns.NewFromConfig(cfg)
	if _, err := client.ListTopics(cctx, &awssns.ListTopicsInput{}); !reached(err) {
		return nil, nil, fmt.Errorf("cannot reach %s within %s: %s", where, connectTimeout, f.hideSecrets(err.Error()))
	}
	topics, _ := pairs("sns-topics", f.aws.snsTopics)
	p, err := sns.NewPublisher(client, sns.PublisherConfig{TopicARNs: topics, ARNPrefix: f.aws.snsPrefix})
	if err != nil {
		return nil, nil, err
	}
	log.Info("publishing to SNS", "region", cfg.Region, "endpoint", hide.String(f.aws.endpoint), "mapped_topics", len(topics))
	return p, func() {}, nil
}
