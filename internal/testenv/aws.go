package testenv

import (
	"net/url"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
)

// SQS is the SQS and SNS emulator (fauxqs), which scripts/test starts on a
// free port and names in EXACTLY_TEST_SQS_ENDPOINT.
var SQS = Service{"SQS/SNS emulator (fauxqs)", endpointAddr(SQSEndpoint()), "scripts/aws-emulator start 4566"}

// SQSEndpoint is the base URL of the SQS and SNS emulator.
func SQSEndpoint() string { return envOr("EXACTLY_TEST_SQS_ENDPOINT", "http://127.0.0.1:4566") }

// AWSRegion is the region the tests sign their requests for; the emulator
// keeps each region's queues and topics apart.
const AWSRegion = "us-east-1"

// AWSConfig returns the SDK configuration of the emulator: its endpoint,
// AWSRegion and static test credentials (the emulator checks none). It
// skips (or, under CI, fails) the test when the emulator is not running.
func AWSConfig(t testing.TB) aws.Config {
	t.Helper()
	Need(t, SQS)
	return aws.Config{
		Region:       AWSRegion,
		BaseEndpoint: aws.String(SQSEndpoint()),
		Credentials:  credentials.NewStaticCredentialsProvider("test", "test", ""),
	}
}

func endpointAddr(endpoint string) string {
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		return endpoint
	}
	if u.Port() == "" {
		return u.Hostname() + ":80"
	}
	return u.Host
}
