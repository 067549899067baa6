/*
 * A libmilter milter for the load tests: header and end-of-message callbacks only.
 *
 *     c_milter SOCKET MARKER [nr]
 *
 * Adds "X-Bench: 1" at end of message, or rejects with "550 5.7.1 marked" when a
 * Subject contains MARKER. With "nr" it negotiates (xxfi_negotiate) no reply for
 * headers (SMFIP_NR_HDR), leading spaces (SMFIP_HDR_LEADSPC) and a macro list for
 * end of message (SETSYMLIST, "i {mail_addr}"); the end-of-message callback then
 * tempfails a message whose macros are missing, so a wrong macro list shows.
 * Prints "ready" once the socket listens.
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *marker;
static int no_reply;

struct message {
    int marked;
};

static sfsistat on_header(SMFICTX *ctx, char *name, char *value) {
    struct message *m = smfi_getpriv(ctx);
    if (m == NULL) {
        m = calloc(1, sizeof *m);
        if (m == NULL)
            return SMFIS_TEMPFAIL;
        smfi_setpriv(ctx, m);
    }
    if (strcasecmp(name, "Subject") == 0 && strstr(value, marker) != NULL)
        m->marked = 1;
    return SMFIS_CONTINUE;
}

static sfsistat on_eom(SMFICTX *ctx) {
    struct message *m = smfi_getpriv(ctx);
    int marked = m != NULL && m->marked;
    if (m != NULL)
        m->marked = 0;
    if (no_reply && (smfi_getsymval(ctx, "i") == NULL
                     || smfi_getsymval(ctx, "{mail_addr}") == NULL)) {
        smfi_setreply(ctx, "451", "4.7.1", "macros missing");
        return SMFIS_TEMPFAIL;
    }
    if (marked) {
        smfi_setreply(ctx, "550", "5.7.1", "marked");
        return SMFIS_REJECT;
    }
    if (smfi_addheader(ctx, "X-Bench", no_reply ? " 1" : "1") != MI_SUCCESS)
        return SMFIS_TEMPFAIL;
    return SMFIS_CONTINUE;
}

static sfsistat on_abort(SMFICTX *ctx) {
    struct message *m = smfi_getpriv(ctx);
    if (m != NULL)
        m->marked = 0;
    return SMFIS_CONTINUE;
}

static sfsistat on_close(SMFICTX *ctx) {
    free(smfi_getpriv(ctx));
    smfi_setpriv(ctx, NULL);
    return SMFIS_CONTINUE;
}

static sfsistat on_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1,
                             unsigned long f2, unsigned long f3, unsigned long *pf0,
                             unsigned long *pf1, unsigned long *pf2, unsigned long *pf3) {
    (void)f2;
    (void)f3;
    if (!no_reply)
        return SMFIS_ALL_OPTS;
    unsigned long wanted = SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT
                           | SMFIP_NOBODY | SMFIP_NOEOH | SMFIP_NOUNKNOWN | SMFIP_NODATA
                           | SMFIP_NR_HDR | SMFIP_HDR_LEADSPC;
    if ((f1 & wanted) != wanted || !(f0 & SMFIF_SETSYMLIST))
        return SMFIS_REJECT;
    *pf0 = SMFIF_ADDHDRS | SMFIF_SETSYMLIST;
    *pf1 = wanted;
    *pf2 = 0;
    *pf3 = 0;
    if (smfi_setsymlist(ctx, SMFIM_EOM, "i {mail_addr}") != MI_SUCCESS)
        return SMFIS_REJECT;
    return SMFIS_CONTINUE;
}

int main(int argc, char **argv) {
    struct smfiDesc desc = {
        .xxfi_name = "c_milter",
        .xxfi_version = SMFI_VERSION,
        .xxfi_flags = SMFIF_ADDHDRS,
        .xxfi_header = on_header,
        .xxfi_eom = on_eom,
        .xxfi_abort = on_abort,
        .xxfi_close = on_close,
        .xxfi_negotiate = on_negotiate,
    };
    if (argc < 3) {
        fprintf(stderr, "usage: %s SOCKET MARKER [nr]\n", argv[0]);
        return 2;
    }
    marker = argv[2];
    no_reply = argc > 3 && strcmp(argv[3], "nr") == 0;
    if (no_reply)
        desc.xxfi_flags |= SMFIF_SETSYMLIST;
    if (smfi_setconn(argv[1]) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS
        || smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "c_milter: cannot listen on %s\n", argv[1]);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
