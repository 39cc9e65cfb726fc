"""Drives custosd with the stock Python gRPC reflection client.

Run by the integration test `signing_core::the_stock_python_reflection_client_lists_describes_and_calls`
against a live `custosd --dev`, with grpcio and grpcio-reflection from PyPI
(scripts/test.sh installs them in a virtualenv under target/). It knows
nothing of custos but the address and the dev TLS files: every service,
message and method it uses comes from reflection, as it would for an
integrator's first grpcurl-like session.

Usage: reflection_client.py ENDPOINT CA_CERT CLIENT_CERT CLIENT_KEY
Prints one JSON object with what it found; exits non-zero on any failure.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    endpoint, ca, cert, key = sys.argv[1:5]
    target = endpoint.split("://", 1)[-1]
    with open(ca, "rb") as f_ca, open(cert, "rb") as f_cert, open(key, "rb") as f_key:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=f_ca.read(),
            private_key=f_key.read(),
            certificate_chain=f_cert.read(),
        )
    with grpc.secure_channel(target, credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        wallets = pool.FindServiceByName("custos.v1.WalletService")
        method = wallets.methods_by_name["ListWallets"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{wallets.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response = call(request_class(page_size=10), timeout=10)
        print(
            json.dumps(
                {
                    "services": services,
                    "wallet_service_methods": sorted(wallets.methods_by_name),
                    "list_wallets_input_fields": [f.name for f in method.input_type.fields],
                    "list_wallets": json_format.MessageToDict(response),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
