def refit_moe(params, meta, lam):
    lp = params["layers"]
    sidx, cidx = meta["shared_index"], meta["channel_index"]
    L, E = cidx.shape[0], cidx.shape[1]
    swd = np.array(lp["shared_wd"], np.float64); ewd = np.array(lp["wd"], np.float64)
    for l in range(L):
        s0 = sidx[l][sidx[l] >= 0]
        se = [cidx[l, e][cidx[l, e] >= 0] for e in range(E)]
        sizes = [len(s0)] + [len(x) for x in se]
        off = np.cumsum([0] + sizes)
        A = np.zeros((off[-1], off[-1])); B = np.zeros((off[-1], wd.shape[-1]))
        for e in range(E):
            G = Gm[e, l]
            idx = np.concatenate([s0, se[e]])
            blk = [slice(off[0], off[1]), slice(off[e+1], off[e+2])]
            sub = G[np.ix_(idx, idx)]
            rhs = G[idx] @ wd[l]
            n0 = len(s0)
            A[blk[0], blk[0]] += sub[:n0, :n0]; A[blk[0], blk[1]] += sub[:n0, n0:]
            A[blk[1], blk[0]] += sub[n0:, :n0]; A[blk[1], blk[1]] += sub[n0:, n0:]
            B[blk[0]] += rhs[:n0]; B[blk[1]] += rhs[n0:]
        reg = lam * np.mean(np.diag(A))
        W = np.linalg.solve(A + reg * np.eye(len(A)), B)
        swd[l, :len(s0)] = W[:len(s0)]
        for e in range(E):
            ewd[l, e, :len(se[e])] = W[off[e+1]:off[e+2]]
    out = dict(params); out["layers"] = dict(lp)
    out["layers"]["shared_wd"] = jnp.asarray(swd, jnp.float32); out["layers"]["wd"] = jnp.asarray(ewd, jnp.float32)
    return out

def refit_pruned(params, idx, lam):
    Gp = Gm.mean(0)
    pwd = np.array(params["layers"]["wd"], np.float64)
    for l in range(idx.shape[0]):
        S = idx[l]
        A = Gp[l][np.ix_(S, S)]; B = Gp[l][S] @ wd[l]
        pwd[l] = np.linalg.solve(A + lam * np.mean(np.diag(A)) * np.eye(len(S)), B)
    out = dict(params); out["layers"] = dict(params["layers"]); out["layers"]["wd"] = jnp.asarray(pwd, jnp.float32)
    return out

