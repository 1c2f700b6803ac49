package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"google.golang.org/api/iterator"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/pubsub"
)

// pubsubTopicMap parses --pubsub-topics, "topic=pubsub-topic" pairs, into
// the full Pub/Sub topic name of each outbox topic, checking every name.
func pubsubTopicMap(project, list string) (map[string]string, error) {
	m := map[string]string{}
	for _, pair := range splitList(list) {
		from, to, ok := strings.Cut(pair, "=")
		from, to = strings.TrimSpace(from), strings.TrimSpace(to)
		if !ok || from == "" || to == "" {
			return nil, fmt.Errorf("--pubsub-topics: %q is not topic=pubsub-topic", pair)
		}
		if _, dup := m[from]; dup {
			return nil, fmt.Errorf("--pubsub-topics: topic %q is mapped twice", from)
		}
		name, err := pubsub.TopicName(project, to)
		if err != nil {
			return nil, fmt.Errorf("--pubsub-topics: %s: %w", from, err)
		}
		m[from] = name
	}
	return m, nil
}

// checkPubsub validates the --broker pubsub settings.
func (f *relayFlags) checkPubsub() error {
	if f.pubsubProject == "" {
		return errors.New("--pubsub-project is required with --broker pubsub (or EXACTLY_PUBSUB_PROJECT): the Google Cloud project of the topics")
	}
	if f.tls.wanted() {
		return errors.New("--tls, --tls-ca, --tls-cert, --tls-key and --tls-server-name are not for --broker pubsub: the client always uses TLS to Google, and PUBSUB_EMULATOR_HOST none")
	}
	_, err := pubsubTopicMap(f.pubsubProject, f.pubsubTopics)
	return err
}

// newPubsubPublisher connects to Pub/Sub (or the emulator named by
// PUBSUB_EMULATOR_HOST) with Application Default Credentials and checks that
// the service answers.
func (f *relayFlags) newPubsubPublisher(ctx, cctx context.Context, log *slog.Logger) (exactly.Publisher, func(), error) {
	topics, err := pubsubTopicMap(f.pubsubProject, f.pubsubTopics)
	if err != nil {
		return nil, nil, err
	}
	where := "Pub/Sub"
	if host := os.Getenv("PUBSUB_EMULATOR_HOST"); host != "" {
		where = "the Pub/Sub emulator at " + host + " (PUBSUB_EMULATOR_HOST)"
	}
	client, err := gpubsub.NewClient(ctx, f.pubsubProject)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot connect to %s: %s (credentials: Application Default Credentials, e.g. GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login)",
			where, f.hideSecrets(err.Error()))
	}
	// Any answer proves the service and the credentials; a publisher's
	// role may lack pubsub.topics.list, so a refusal counts as one.
	_, err = client.TopicAdminClient.ListTopics(cctx, &pb.ListTopicsRequest{Project: "projects/" + f.pubsubProject, PageSize: 1}).Next()
	if code := status.Code(err); err != nil && code != codes.PermissionDenied && code != codes.NotFound && !errors.Is(err, iterator.Done) {
		client.Close()
		return nil, nil, fmt.Errorf("cannot reach %s for project %s within %s: %s", where, f.pubsubProject, connectTimeout, f.hideSecrets(err.Error()))
	}
	p, err := pubsub.NewPublisher(client, pubsub.PublisherConfig{Topic: func(m *exactly.Message) string {
		if name, ok := topics[m.Topic]; ok {
			return name
		}
		return m.Topic
	}})
	if err != nil {
		client.Close()
		return nil, nil, err
	}
	log.Info("publishing to Pub/Sub", "project", f.pubsubProject, "mapped_topics", len(topics), "emulator", os.Getenv("PUBSUB_EMULATOR_HOST") != "")
	return p, func() { _ = p.Close(); _ = client.Close() }, nil
}
