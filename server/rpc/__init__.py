"""The RPC layer: the servicer (decode, call the engine, encode) and the front door every
call passes through (metrics, drain, auth, decode guard, error mapping), applied once per
method when the services are registered. It talks to the engine only."""
