/*
 * The benchmark policy on sendmail's libmilter, with every callback registered.
 *
 *     c_policy SOCKET MARKER
 *
 * Adds "X-Bench: 1" at end of message, or rejects with "550 5.7.1 marked" when a
 * Subject contains MARKER. Prints "ready" once the socket listens.
 *
 * Every callback is registered although the policy needs only header and end of
 * message: libmilter tells the MTA not to send (SMFIP_NO*) the events that have
 * no callback, so this milter receives, and answers, every event of a message,
 * as the pymilter policy (bench/pymilter_policy.py) does. tests/load/c_milter.c
 * is the same policy with header and end-of-message callbacks only.
 * No xxfi_negotiate: libmilter's own negotiation, as most C milters leave it.
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *marker;

struct connection {
    int marked;
};

static struct connection *conn(SMFICTX *ctx) {
    return smfi_getpriv(ctx);
}

static sfsistat on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr) {
    (void)host;
    (void)addr;
    struct connection *c = calloc(1, sizeof *c);
    if (c == NULL)
        return SMFIS_TEMPFAIL;
    smfi_setpriv(ctx, c);
    return SMFIS_CONTINUE;
}

static sfsistat on_helo(SMFICTX *ctx, char *name) {
    (void)ctx;
    (void)name;
    return SMFIS_CONTINUE;
}

static sfsistat on_envfrom(SMFICTX *ctx, char **argv) {
    (void)argv;
    struct connection *c = conn(ctx);
    if (c == NULL)
        return SMFIS_TEMPFAIL;
    c->marked = 0; /* a new message */
    return SMFIS_CONTINUE;
}

static sfsistat on_envrcpt(SMFICTX *ctx, char **argv) {
    (void)ctx;
    (void)argv;
    return SMFIS_CONTINUE;
}

static sfsistat on_data(SMFICTX *ctx) {
    (void)ctx;
    return SMFIS_CONTINUE;
}

static sfsistat on_header(SMFICTX *ctx, char *name, char *value) {
    struct connection *c = conn(ctx);
    if (c != NULL && strcasecmp(name, "Subject") == 0 && strstr(value, marker) != NULL)
        c->marked = 1;
    return SMFIS_CONTINUE;
}

static sfsistat on_eoh(SMFICTX *ctx) {
    (void)ctx;
    return SMFIS_CONTINUE;
}

static sfsistat on_body(SMFICTX *ctx, unsigned char *chunk, size_t size) {
    (void)ctx;
    (void)chunk;
    (void)size;
    return SMFIS_CONTINUE;
}

static sfsistat on_eom(SMFICTX *ctx) {
    struct connection *c = conn(ctx);
    if (c == NULL)
        return SMFIS_TEMPFAIL;
    if (c->marked) {
        smfi_setreply(ctx, "550", "5.7.1", "marked");
        return SMFIS_REJECT;
    }
    if (smfi_addheader(ctx, "X-Bench", "1") != MI_SUCCESS)
        return SMFIS_TEMPFAIL;
    return SMFIS_CONTINUE;
}

static sfsistat on_abort(SMFICTX *ctx) {
    struct connection *c = conn(ctx);
    if (c != NULL)
        c->marked = 0;
    return SMFIS_CONTINUE;
}

static sfsistat on_close(SMFICTX *ctx) {
    free(conn(ctx));
    smfi_setpriv(ctx, NULL);
    return SMFIS_CONTINUE;
}

static sfsistat on_unknown(SMFICTX *ctx, const char *command) {
    (void)ctx;
    (void)command;
    return SMFIS_CONTINUE;
}

int main(int argc, char **argv) {
    struct smfiDesc desc = {
        .xxfi_name = "c_policy",
        .xxfi_version = SMFI_VERSION,
        .xxfi_flags = SMFIF_ADDHDRS,
        .xxfi_connect = on_connect,
        .xxfi_helo = on_helo,
        .xxfi_envfrom = on_envfrom,
        .xxfi_envrcpt = on_envrcpt,
        .xxfi_header = on_header,
        .xxfi_eoh = on_eoh,
        .xxfi_body = on_body,
        .xxfi_eom = on_eom,
        .xxfi_abort = on_abort,
        .xxfi_close = on_close,
        .xxfi_unknown = on_unknown,
        .xxfi_data = on_data,
    };
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET MARKER\n", argv[0]);
        return 2;
    }
    marker = argv[2];
    if (smfi_setconn(argv[1]) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS
        || smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "c_policy: cannot listen on %s\n", argv[1]);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
