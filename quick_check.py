import torch, longreach, itertools
from longreach import reference as ref
torch.manual_seed(0)
def check(B=2,Hq=4,Hk=2,Lq=37,Lk=50,D=16,dtype=torch.float64, **kw):
    q=torch.randn(B,Hq,Lq,D,dtype=dtype,requires_grad=True)
    k=torch.randn(B,Hk,Lk,D,dtype=dtype,requires_grad=True)
    v=torch.randn(B,Hk,Lk,D,dtype=dtype,requires_grad=True)
    o=longreach.local_attention(q,k,v,**kw)
    r=ref.local_attention(q,k,v,**kw)
    g=torch.randn_like(o)
    gq=torch.autograd.grad(o,(q,k,v),g)
    gr=torch.autograd.grad(r,(q,k,v),g)
    errs=[(o-r).abs().max().item()]+[(a-b).abs().max().item() for a,b in zip(gq,gr)]
    return max(errs)
slopes=torch.tensor([0.5,0.25,-0.125,-0.0625])
gm=torch.zeros(2,50,dtype=torch.bool); gm[0,3]=True; gm[0,40]=True; gm[1,25]=True; gm[1,49]=True
worst=0
for window in [(None,None),(3,0),(16,16),(5,2),(0,0)]:
  for dil in [1,2,3]:
    for score in ["softmax","sigmoid"]:
      for al in [None, slopes]:
        for sc in [None, 5.0]:
          for g in [None, gm]:
            for causal in [False, True]:
              e=check(window=window,dilation=dil,score=score,alibi_slopes=al,softcap=sc,global_mask=g,causal=causal)
              if e>1e-9: print("FAIL",window,dil,score,al is not None,sc,g is not None,causal,e)
              worst=max(worst,e)
print("worst",worst)
for Lq,Lk in [(1,1),(1,50),(60,20),(200,200),(150,300)]:
    print(Lq,Lk,check(Lq=Lq,Lk=Lk,window=(7,3),dilation=2), check(Lq=Lq,Lk=Lk,window=(7,3),dilation=2, global_mask=torch.rand(2,Lk)<0.1, score="sigmoid"))
